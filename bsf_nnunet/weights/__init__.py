"""Pretrained weights: read any supported checkpoint, map input channels by name, copy tensors into a model.

See docs/weights.md. Public API::

    load_checkpoint(path, allow_unsafe_pickle=False) -> Checkpoint                      (loader.py: read any format)
    guess_variant(state_dict) -> (name or None, description)
    transfer_weights(model, checkpoint, *, source_channels=None, target_channels=None, encoder_only=False,
                     strict_encoder=True, verbose=True, allow_merging_mismatch=False,
                     checkpoint_merging=None) -> TransferReport
    normalise_channel_name(name), map_channels(source_names, target_names), parse_channel_list(text)
    resolve_checkpoint(path | "bsf:NAME" | "hf://OWNER/REPO/FILE") -> ResolvedCheckpoint (path, entry, source;
        .load() -> Checkpoint), published_weights() -> {name: PublishedWeights}    (hub.py: Hugging Face downloads)
"""
from .architecture import describe_architecture, guess_variant
from .channels import (
                       ALIASES,
                       PRETRAINED_CHANNELS_ENV,
                       PRETRAINED_CHANNELS_OPTION,
                       ChannelMappingError,
                       map_channels,
                       normalise_channel_name,
                       parse_channel_list,
                       resolve_channel_mapping,
)
from .hub import HubError, PublishedWeights, ResolvedCheckpoint, is_hub_spec, published_weights, resolve_checkpoint
from .loader import (
                       FORMATS,
                       UNSAFE_PICKLE_ENV,
                       UNSAFE_PICKLE_OPTION,
                       Checkpoint,
                       CheckpointError,
                       WeightsMismatchError,
                       checkpoint_from_object,
                       load_checkpoint,
                       normalise_state_dict,
                       read_checkpoint_file,
)
from .transfer import TransferReport, model_merging, transfer_weights

__all__ = [
    "ALIASES", "FORMATS", "PRETRAINED_CHANNELS_ENV", "PRETRAINED_CHANNELS_OPTION", "UNSAFE_PICKLE_ENV",
    "UNSAFE_PICKLE_OPTION", "ChannelMappingError", "Checkpoint", "CheckpointError", "TransferReport",
    "WeightsMismatchError", "checkpoint_from_object", "describe_architecture", "guess_variant", "load_checkpoint",
    "map_channels", "model_merging", "normalise_channel_name", "normalise_state_dict", "parse_channel_list",
    "read_checkpoint_file", "resolve_channel_mapping", "transfer_weights",
    "HubError", "PublishedWeights", "ResolvedCheckpoint", "is_hub_spec", "published_weights", "resolve_checkpoint",
]
