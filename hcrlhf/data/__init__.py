"""Preference and prompt data: loading and validation (PKU-SafeRLHF schema), the candidate / safety
split (docs/method.md#data-split), FDC category composition of prompts and of preference pairs, with
pluggable category labellers (docs/method.md#equilibrate-rlhf), templates and tokenization, and the
built-in offline task (:mod:`hcrlhf.data.builtin`, imported on demand)."""

from hcrlhf.data.fdc import (
    DEFAULT_HARM_WORDS,
    DEFAULT_INTENT_WORDS,
    JUDGE_PROMPT,
    CategoryLabeller,
    JudgeLabeller,
    KeywordLabeller,
    builtin_labeller,
    compose_preferences,
    parse_judge_output,
)
from hcrlhf.data.lm_rows import read_lm_rows
from hcrlhf.data.preferences import (
    FDC_CATEGORIES,
    PREFERENCE_COLUMNS,
    DatasetUnavailableError,
    PreferenceLoadReport,
    RowProblem,
    load_preferences,
    validate_preference_row,
)
from hcrlhf.data.prompts import (
    CategoryComposition,
    PromptSplit,
    category_counts,
    compose_by_category,
    prompt_set,
    split_dataset,
    split_prompts,
)
from hcrlhf.data.templates import (
    PLAIN_TEMPLATE,
    SAFE_RLHF_TEMPLATE,
    ChatTemplate,
    PromptTemplate,
    TokenizedBatch,
    end_indices,
    get_template,
    pad_sequences,
    tokenize_pairs,
    tokenize_prompts,
)

__all__ = [
    "FDC_CATEGORIES",
    "PREFERENCE_COLUMNS",
    "DatasetUnavailableError",
    "PreferenceLoadReport",
    "RowProblem",
    "load_preferences",
    "validate_preference_row",
    "CategoryComposition",
    "PromptSplit",
    "category_counts",
    "compose_by_category",
    "prompt_set",
    "split_dataset",
    "split_prompts",
    "PLAIN_TEMPLATE",
    "SAFE_RLHF_TEMPLATE",
    "ChatTemplate",
    "PromptTemplate",
    "TokenizedBatch",
    "end_indices",
    "get_template",
    "pad_sequences",
    "tokenize_pairs",
    "tokenize_prompts",
    "read_lm_rows",
    "CategoryLabeller",
    "KeywordLabeller",
    "JudgeLabeller",
    "JUDGE_PROMPT",
    "DEFAULT_HARM_WORDS",
    "DEFAULT_INTENT_WORDS",
    "builtin_labeller",
    "compose_preferences",
    "parse_judge_output",
]
