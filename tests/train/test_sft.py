"""train_sft on the built-in task's tiny policy, CPU: the same seed gives the same weights and NLL curve (another
seed another row order), the policy is left in eval mode and torch's global generator is left as it was. (That
the NLL falls is tested through the pipeline's SFT stage, tests/test_pipeline.py.)"""

import torch

from hcrlhf.data.lm_rows import read_lm_rows
from hcrlhf.train import train_sft


def run(task, tokenizer, rows, kind, seed):
    policy = task.load_policy()
    curve = train_sft(policy, tokenizer, rows, kind=kind, template=task.template, steps=4, batch_size=3,
                      learning_rate=1e-2, max_length=48, micro_batch_tokens=64, seed=seed)
    return policy, curve


def test_train_sft_is_a_function_of_the_seed(task, tokenizer):
    rows, kind, _ = read_lm_rows(task.sft_path, name="sft.path")
    rows = rows[:7]
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first, curve = run(task, tokenizer, rows, kind, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is restored
    assert [c["step"] for c in curve] == [1, 2, 3, 4] and all(c["nll"] > 0 for c in curve)
    assert not first.training
    second, again = run(task, tokenizer, rows, kind, seed=3)
    assert again == curve
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    _, other = run(task, tokenizer, rows, kind, seed=4)  # another row order
    assert other != curve
