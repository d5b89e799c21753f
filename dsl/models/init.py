"""Where a training run's weights start: ``init=scratch``, one of our checkpoints, or MDLM's weights."""

from __future__ import annotations

from torch import nn

from dsl.errors import UserError


def initialise_weights(model: nn.Module, init: str, objective: str) -> None:
    """Load ``init`` into ``model`` (built for ``objective``); ``scratch`` keeps the seeded initialisation.

    A checkpoint contributes its EMA weights when it has them. An MDLM checkpoint initialises a DSL model
    (Sec 6.1: backbone, and W_trans from MDLM's vocab_embed); otherwise the objectives must match.
    """
    from dsl.checkpoint import MANIFEST, latest_complete, load_checkpoint
    from dsl.model_spec import INIT_KINDS, parse_model_spec
    from dsl.models.loading import load_weights
    from dsl.storage import open_storage

    spec = parse_model_spec(init, "init", INIT_KINDS)
    if spec.kind == "scratch":
        return
    if not spec.ours:
        from dsl.models.mdlm_weights import init_from_mdlm

        init_from_mdlm(model, init)
        return
    storage = open_storage(init)
    uri = init if storage.exists(MANIFEST) else latest_complete(storage)
    if uri is None:
        raise UserError(f"init={init}: no complete checkpoint there")
    ckpt = load_checkpoint(uri)
    weights = ckpt.ema_state if ckpt.ema_state is not None else ckpt.model_state
    source_objective = ckpt.config.get("objective")
    if source_objective == "mdlm" and objective == "dsl":
        from dsl.models.mdlm_weights import init_dsl_from_mdlm

        init_dsl_from_mdlm(model, weights, f"init={ckpt.uri}")
    elif source_objective not in (None, objective):
        raise UserError(f"init={ckpt.uri}: a {source_objective} checkpoint cannot initialise "
                        f"objective={objective} (accepted: the same objective, or mdlm for dsl)")
    else:
        load_weights(model, weights, f"init={ckpt.uri}")


__all__ = ["initialise_weights"]
