from numerics import poisoned_outputs  # noqa: F401  (fixture)
