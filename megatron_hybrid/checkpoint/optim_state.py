"""Optimizer state in a sharded checkpoint, resharded like the parameters it belongs to.

Megatron's (non-distributed) optimizers describe their state with ``sharded_state_dict``: Adam's
``exp_avg`` / ``exp_avg_sq`` (and bf16 main parameters) become ShardedTensors keyed
``optimizer.state.<name>.<parameter key>`` and sharded exactly like their parameter, so they
reshard with it; the shared step counter is saved once (``common_step``).

Parameter-group hyper-parameters are *not* saved: they come from the run's config (the learning
rate from its schedule at the resumed step). Saving them would tie the checkpoint to the layout,
because the groups differ per pipeline stage (a stage with only 2-D parameters has no
no-weight-decay group) while the common part of a checkpoint is written by rank 0 alone.
"""

from __future__ import annotations

import copy
from typing import Any

from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject

__all__ = ["load_optimizer_state", "optimizer_sharded_state_dict"]


def _runtime_groups(tree: Any) -> None:
    """Replace every ``param_groups`` list by a non-persistent copy of the runtime groups."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        if key == "param_groups" and isinstance(value, list):
            groups = []
            for g in value:
                g = copy.copy(g)
                params = g.get("params")
                if isinstance(params, LocalNonpersistentObject):
                    g["params"] = params.unwrap()
                groups.append(g)
            tree[key] = LocalNonpersistentObject(groups)
        else:
            _runtime_groups(value)


def optimizer_sharded_state_dict(optimizer, model_sharded: dict, *, is_loading: bool) -> dict:
    """The optimizer's sharded state dict for the parameters in ``model_sharded``.

    ``model_sharded`` must contain every parameter the optimizer updates (the trainables); its
    ShardedTensors give the optimizer state its keys and sharding.
    """
    sd = optimizer.sharded_state_dict(model_sharded, is_loading=is_loading)
    _runtime_groups(sd)
    return sd


def _drop_foreign_state(tree: Any) -> None:
    """Remove per-parameter state of ids that this rank's optimizer does not have.

    The common part of a checkpoint (written by rank 0) carries rank 0's parameter ids with empty
    entries; on other ranks or layouts they do not exist.
    """
    if not isinstance(tree, dict):
        return
    if "state" in tree and "param_groups" in tree:
        ids = {i for g in tree["param_groups"] for i in g["params"]}
        state = tree["state"]
        for k in list(state):
            if k != "common_step" and (k not in ids or not state[k]):
                del state[k]
        return
    for value in tree.values():
        _drop_foreign_state(value)


def load_optimizer_state(optimizer, loaded: dict) -> None:
    """Load what ``dist_checkpointing.load`` returned for :func:`optimizer_sharded_state_dict`."""
    _drop_foreign_state(loaded)
    optimizer.load_state_dict(loaded)
