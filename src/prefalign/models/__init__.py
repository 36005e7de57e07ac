"""Models: causal LM and tokenizer load/save (causal_lm), the checks made before loading
(checks), the reward model (reward) and the checks that a directory is one
(reward_checks), and PPO's value head (value_head)."""

from prefalign.models.causal_lm import (
    QUANTIZATIONS,
    disable_dropout,
    load_causal_lm,
    load_tokenizer,
    model_reference,
    prepare_for_training,
    quantization_config,
    save_policy,
)
from prefalign.models.checks import (
    adapter_base,
    check_fits_in_memory,
    check_vocabulary,
    check_weight_files,
    not_found,
    parameter_count,
    pickle_hint,
    read_json_file,
    remote_code_hint,
)
from prefalign.models.reward import (
    RewardModel,
    init_reward_model,
    load_reward_model,
    reward_token_index,
)
from prefalign.models.reward_checks import (
    REWARD_MODEL_FIX,
    check_reward_model,
    head_shape,
    is_sequence_classification_dir,
)
from prefalign.models.value_head import (
    VALUE_HEAD_FILE,
    PolicyWithValue,
    ValueHead,
    critic_backbone,
    load_value_head,
    save_value_head,
)

__all__ = [
    "QUANTIZATIONS", "REWARD_MODEL_FIX", "VALUE_HEAD_FILE", "PolicyWithValue", "RewardModel",
    "ValueHead", "adapter_base", "check_fits_in_memory", "check_reward_model",
    "check_vocabulary", "check_weight_files", "critic_backbone", "disable_dropout",
    "head_shape", "init_reward_model", "is_sequence_classification_dir", "load_causal_lm",
    "load_reward_model", "load_tokenizer", "load_value_head", "model_reference", "not_found",
    "parameter_count", "pickle_hint", "prepare_for_training", "quantization_config",
    "read_json_file", "remote_code_hint", "reward_token_index", "save_policy",
    "save_value_head",
]
