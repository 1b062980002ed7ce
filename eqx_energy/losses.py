"""Contrastive losses for the energy head. Batched: inputs carry a leading b axis.

Every loss returns `(loss, metrics)` with at least the keys of `METRIC_KEYS` (f32 scalars):
loss, e_pos (mean positive energy), e_neg (mean negative energy), accuracy (the positive has the
lowest energy), logit_min, logit_max, energy_std (std of every energy the loss saw).
Masks are True = valid; actions are the energy's `action_dim` dims in normalized space.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray

from eqx_energy._typing import BatchActions, BatchContext, BatchContextMask, Scalar
from eqx_energy.energy import ContextEncoding, EnergyModel
from eqx_energy.select import score_candidates

LOGIT_CLAMP = 50.0
METRIC_KEYS = ("loss", "e_pos", "e_neg", "accuracy", "logit_min", "logit_max", "energy_std")

Metrics = dict[str, Float[Array, ""]]


def _split_or_none(key: PRNGKeyArray | None, num: int):
    return [None] * num if key is None else list(jax.random.split(key, num))


def _encode(model, context, actions, context_mask, key, inference):
    """Context encodings (b of them) and action queries (b of them), each computed once."""
    act_keys = None if key is None else jax.random.split(key, actions.shape[0])
    encode_actions = lambda a, k: model.encode_actions(a, key=k, inference=inference)  # noqa: E731
    queries = jax.vmap(encode_actions)(actions, act_keys)
    return jax.vmap(model.encode_context)(context, context_mask), queries


def _pair_energy(model: EnergyModel, encoding: ContextEncoding, queries: Float[Array, "h d"]) -> Scalar:
    return jnp.mean(model.step_energies(encoding, queries))


def pairwise_energies(
    model: EnergyModel,
    encodings: ContextEncoding,
    queries: Float[Array, "b h d"],
    *,
    chunk: int | None = None,
) -> Float[Array, "b b"]:
    """E_ij = E(context_i, actions_j) from b context encodings and b action query sets.

    Rows are computed `chunk` at a time under `jax.checkpoint`, so the backward pass holds one
    chunk's attention activations instead of all b² of them.
    """
    batch = queries.shape[0]
    row = jax.vmap(lambda enc, q: _pair_energy(model, enc, q), in_axes=(None, 0))  # one context against every action chunk
    rows = jax.vmap(row, in_axes=(0, None))
    if chunk is None or chunk >= batch:
        return rows(encodings, queries)
    if batch % chunk:
        raise ValueError(f"chunk={chunk} must divide the batch size b={batch}")
    chunked = jax.tree.map(lambda x: x.reshape(batch // chunk, chunk, *x.shape[1:]), encodings)
    energies = jax.lax.map(jax.checkpoint(lambda enc: rows(enc, queries)), chunked)
    return energies.reshape(batch, batch)


def _logits(energies: Float[Array, "b m"], tau) -> Float[Array, "b m"]:
    return jnp.clip(-energies / tau, -LOGIT_CLAMP, LOGIT_CLAMP)


def _cross_entropy_metrics(energies: Float[Array, "b m"], tau, positive_index) -> tuple[Scalar, Metrics]:
    """CE over logits clip(-E/tau, ±50) with the positive at `positive_index` (b,) per row."""
    logits = _logits(energies, tau)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positive_index))
    return loss, _metrics(loss, energies, logits, positive_index)


def _metrics(loss, energies: Float[Array, "b m"], logits: Float[Array, "b m"], positive_index) -> Metrics:
    """METRIC_KEYS for energies whose positive sits at `positive_index` (b,) of each row."""
    is_positive = jax.nn.one_hot(positive_index, energies.shape[1], dtype=bool)
    num_neg = energies.shape[0] * (energies.shape[1] - 1)
    return {
        "loss": loss,
        "e_pos": jnp.sum(jnp.where(is_positive, energies, 0.0)) / energies.shape[0],
        "e_neg": jnp.sum(jnp.where(is_positive, 0.0, energies)) / max(num_neg, 1),
        "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == positive_index).astype(jnp.float32),
        "logit_min": jnp.min(logits),
        "logit_max": jnp.max(logits),
        "energy_std": jnp.std(energies),
    }


def infonce_inbatch(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    *,
    tau: float | Float[Array, ""],
    key: PRNGKeyArray | None = None,
    inference: bool = False,
    chunk: int | None = None,
) -> tuple[Scalar, Metrics]:
    """In-batch swap InfoNCE (seed 002): other samples' chunks are the negatives.

    E_ij = E(c_i, a_j); logits_ij = clip(-E_ij / tau, ±50); loss = CE(logits, diag).
    Factored: b context encodings and b action encodings, never b² context copies.
    Dropout (on the action tokens) is active when `key` is given and `inference=False`.
    """
    encodings, queries = _encode(model, context, actions, context_mask, key, inference)
    energies = pairwise_energies(model, encodings, queries, chunk=chunk)
    return _cross_entropy_metrics(energies, tau, jnp.arange(actions.shape[0]))


def sample_negative_indices(key: PRNGKeyArray, batch: int, num: int) -> Int[Array, "b k"]:
    """n_ij = (i + 1 + pi_i(j)) mod b for j < k, pi_i a random permutation of 0..b-2 drawn per row:
    k distinct other examples for each example i, never i itself."""
    if not 0 < num < batch:
        raise ValueError(
            f"num_negatives={num} sampled negatives need 1 <= k <= b - 1 = {batch - 1} (the batch holds "
            f"{batch - 1} other examples); lower loss.num_negatives or raise data.batch_size"
        )
    offsets = jax.vmap(lambda k: jax.random.permutation(k, batch - 1)[:num])(jax.random.split(key, batch))
    return (jnp.arange(batch)[:, None] + 1 + offsets) % batch


def infonce_sampled(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    negative_index: Int[Array, "b k"],
    *,
    tau: float | Float[Array, ""],
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Scalar, Metrics]:
    """In-batch InfoNCE over k sampled negatives: context i against its own chunk and k others'.

    E_i0 = E(c_i, a_i), E_ij = E(c_i, a_{n_ij}) (j = 1..k); logits = clip(-E / tau, ±50);
    loss = CE(logits, 0). b (k + 1) pair scores instead of `infonce_inbatch`'s b²; with k = b - 1
    the two losses are equal (CE does not depend on the order of the negatives). `negative_index`
    (b, k) from `sample_negative_indices`: row i must not contain i (checked with `eqx.error_if`).
    Dropout as in `infonce_inbatch`.
    """
    batch = actions.shape[0]
    rows = jnp.arange(batch)[:, None]
    negative_index = eqx.error_if(
        negative_index,
        jnp.any((negative_index == rows) | (negative_index < 0) | (negative_index >= batch)),
        "negative_index holds an example's own index (its positive) or one outside [0, b); "
        "build it with sample_negative_indices",
    )
    encodings, queries = _encode(model, context, actions, context_mask, key, inference)
    candidates = queries[jnp.concatenate([rows, negative_index], axis=1)]  # (b, k + 1, h, d), positive first
    pair = lambda enc, q: _pair_energy(model, enc, q)  # noqa: E731
    energies = jax.vmap(jax.vmap(pair, in_axes=(None, 0)))(encodings, candidates)
    return _cross_entropy_metrics(energies, tau, jnp.zeros(batch, jnp.int32))


# ----------------------------------------------------------------------------- negatives (seed 004)


def gaussian_negatives(
    key: PRNGKeyArray, actions: BatchActions, sigmas: Float[Array, " n"]
) -> Float[Array, "b n h a"]:
    """a + sigma_k * N(0, I), one negative per sigma."""
    noise = jax.random.normal(key, (actions.shape[0], sigmas.shape[0], *actions.shape[1:]))
    return actions[:, None] + sigmas[None, :, None, None] * noise


def shuffle_negatives(key: PRNGKeyArray, actions: BatchActions, num: int = 1) -> Float[Array, "b n h a"]:
    """The chunk's steps in a random order (breaks temporal structure), `num` per example."""
    batch, horizon = actions.shape[:2]
    keys = jax.random.split(key, batch * num).reshape(batch, num)
    perms = jax.vmap(jax.vmap(lambda k: jax.random.permutation(k, horizon)))(keys)
    return jax.vmap(lambda a, p: a[p])(actions, perms)


def swap_negatives(actions: BatchActions, num: int = 1) -> Float[Array, "b n h a"]:
    """Chunks of other samples: a_{(i + k) mod b} for k = 1..num."""
    if not 0 < num < actions.shape[0]:
        raise ValueError(f"swap negatives need 0 < num < b, got num={num}, b={actions.shape[0]}")
    return jnp.stack([jnp.roll(actions, -k, axis=0) for k in range(1, num + 1)], axis=1)


class NegativeSampler(eqx.Module):
    """Builds explicit negatives: gaussian at `sigmas`, `num_shuffle` shuffles, `num_swap` swaps."""

    sigmas: Float[Array, " n"] = eqx.field(converter=lambda x: jnp.asarray(x, jnp.float32))
    num_shuffle: int = eqx.field(static=True, default=1)
    num_swap: int = eqx.field(static=True, default=1)

    def __call__(self, key: PRNGKeyArray, actions: BatchActions) -> Float[Array, "b m h a"]:
        noise_key, shuffle_key = jax.random.split(key)
        parts = [gaussian_negatives(noise_key, actions, self.sigmas)]
        if self.num_shuffle:
            parts.append(shuffle_negatives(shuffle_key, actions, self.num_shuffle))
        if self.num_swap:
            parts.append(swap_negatives(actions, self.num_swap))
        return jnp.concatenate(parts, axis=1)


def _positive_and_negative_energies(model, context, actions, negatives, context_mask, key, inference):
    """E(c_i, a_i) and E(c_i, n_ik), the context encoded once per example."""
    pos_key, neg_key = _split_or_none(key, 2)
    encodings, queries = _encode(model, context, actions, context_mask, pos_key, inference)
    b, m = negatives.shape[:2]
    flat = negatives.reshape(b * m, *negatives.shape[2:])
    neg_keys = None if neg_key is None else jax.random.split(neg_key, b * m)
    encode = lambda a, k: model.encode_actions(a, key=k, inference=inference)  # noqa: E731
    neg_queries = jax.vmap(encode)(flat, neg_keys).reshape(b, m, *queries.shape[1:])
    pair = lambda enc, q: _pair_energy(model, enc, q)  # noqa: E731
    e_pos = jax.vmap(pair)(encodings, queries)
    e_neg = jax.vmap(jax.vmap(pair, in_axes=(None, 0)))(encodings, neg_queries)
    return e_pos, e_neg


def infonce_explicit(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    negatives: Float[Array, "b m h a"],
    *,
    tau: float | Float[Array, ""],
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Scalar, Metrics]:
    """InfoNCE against explicit negatives: logits_i = clip(-[E(c_i,a_i), E(c_i,n_i1..m)] / tau, ±50),
    loss = CE(logits, 0)."""
    e_pos, e_neg = _positive_and_negative_energies(
        model, context, actions, negatives, context_mask, key, inference
    )
    energies = jnp.concatenate([e_pos[:, None], e_neg], axis=1)
    return _cross_entropy_metrics(energies, tau, jnp.zeros(actions.shape[0], jnp.int32))


def hinge(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    negatives: Float[Array, "b m h a"],
    *,
    margin: float | Float[Array, ""] = 0.5,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Scalar, Metrics]:
    """Margin loss mean_ik relu(margin + E(c_i,a_i) - E(c_i,n_ik)): positives at least `margin`
    below every negative. (Seed 004 wrote relu(E_neg - E_pos + margin), which rewards the inverse.)
    Logits in the metrics are -E (tau = 1)."""
    e_pos, e_neg = _positive_and_negative_energies(
        model, context, actions, negatives, context_mask, key, inference
    )
    loss = jnp.mean(jax.nn.relu(margin + e_pos[:, None] - e_neg))
    energies = jnp.concatenate([e_pos[:, None], e_neg], axis=1)
    _, metrics = _cross_entropy_metrics(energies, 1.0, jnp.zeros(actions.shape[0], jnp.int32))
    return loss, {**metrics, "loss": loss}


def mixed(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    negatives: Float[Array, "b m h a"],
    *,
    tau: float | Float[Array, ""],
    margin: float | Float[Array, ""] = 0.5,
    infonce_weight: float | Float[Array, ""] = 1.0,
    margin_weight: float | Float[Array, ""] = 0.0,
    diversity_weight: float | Float[Array, ""] = 0.0,
    min_std: float | Float[Array, ""] = 0.1,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
    chunk: int | None = None,
) -> tuple[Scalar, Metrics]:
    """w_nce * InfoNCE_inbatch + w_margin * hinge(negatives) + w_div * relu(min_std - std(E))
    (seed 004 "方案5"; a schedule over the weights is the caller's business).
    Headline metrics are the in-batch InfoNCE's; each term is reported as loss_<term>."""
    nce_key, hinge_key = _split_or_none(key, 2)
    nce, metrics = infonce_inbatch(
        model, context, actions, context_mask, tau=tau, key=nce_key, inference=inference, chunk=chunk
    )
    margin_loss, hinge_metrics = hinge(
        model, context, actions, context_mask, negatives, margin=margin, key=hinge_key, inference=inference
    )
    diversity = jax.nn.relu(min_std - metrics["energy_std"])
    loss = infonce_weight * nce + margin_weight * margin_loss + diversity_weight * diversity
    return loss, {
        **metrics,
        "loss": loss,
        "loss_infonce": nce,
        "loss_margin": margin_loss,
        "loss_diversity": diversity,
        "e_neg_explicit": hinge_metrics["e_neg"],
    }


# ------------------------------------------------------------------ policy-sample candidates (issue 12)
#
# At inference the energy ranks the policy's own samples in one context (best-of-N selection) or
# steers them inside the flow, so these losses train it on exactly that: per frame, the candidates
# are {a* (index 0), K policy samples}, and the target order is the distance to the expert,
# d_k = ||a_k - a*||² summed over the chunk's h steps and a dims.


def squared_distances(candidates: Float[Array, "b m h a"], expert: BatchActions) -> Float[Array, "b m"]:
    """d_k = sum_{t,j} (a_k - a*)²_{tj}: each candidate's squared distance to the expert chunk."""
    return jnp.sum(jnp.square(candidates - expert[:, None]), axis=(2, 3))


def noise_to_time(
    key: PRNGKeyArray, candidates: Float[Array, "b m h a"], t: Float[Array, " b"]
) -> Float[Array, "b m h a"]:
    """x_t = t eps + (1 - t) a, eps ~ N(0, I) per candidate, one t per frame (openpi's convention:
    t = 1 is noise, t = 0 the clean chunk)."""
    eps = jax.random.normal(key, candidates.shape, candidates.dtype)
    t = t[:, None, None, None]
    return t * eps + (1.0 - t) * candidates


def _candidates_and_energies(model, context, actions, context_mask, samples, t, key, inference):
    """(candidates [a*, samples] (b m h a), their distances to a* (b m), energies (b m))."""
    if samples.shape[0] != actions.shape[0] or samples.shape[2:] != actions.shape[1:]:
        raise ValueError(
            f"samples must be (b k h a) = (b, k, {', '.join(map(str, actions.shape[1:]))}) to match "
            f"actions (b h a) {actions.shape}, got {samples.shape}; slice policy samples to [..., :action_dim]"
        )
    candidates = jnp.concatenate([actions[:, None], samples.astype(actions.dtype)], axis=1)
    distances = squared_distances(candidates, actions)
    noise_key, drop_key = _split_or_none(key, 2)
    if t is not None:
        if noise_key is None:
            raise ValueError("noised candidates (t given) need a key for the noise draws; pass key=")
        candidates = noise_to_time(noise_key, candidates, t)
    encodings = jax.vmap(model.encode_context)(context, context_mask)
    energies = score_candidates(model, encodings, candidates, t, key=drop_key, inference=inference)
    return distances, energies


def _selection_metrics(energies: Float[Array, "b m"], distances: Float[Array, "b m"], chunk_size: int) -> Metrics:
    """How the energy would select among the policy samples (index 1..): agreement of its argmin with
    the nearest sample's, and the per-element squared distance of its pick vs a random sample's."""
    pick = jnp.argmin(energies[:, 1:], axis=1)
    nearest = jnp.argmin(distances[:, 1:], axis=1)
    picked = jnp.take_along_axis(distances[:, 1:], pick[:, None], axis=1)
    return {
        "select_agreement": jnp.mean(pick == nearest).astype(jnp.float32),
        "select_mse": jnp.mean(picked) / chunk_size,
        "sample_mse": jnp.mean(distances[:, 1:]) / chunk_size,
    }


def policy_softmax(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    samples: Float[Array, "b k h a"],
    *,
    tau: float | Float[Array, ""],
    beta: float | Float[Array, ""],
    t: Float[Array, " b"] | None = None,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Scalar, Metrics]:
    """Soft-target cross-entropy over {a*, K policy samples} (CEP, Lu et al. 2023, arXiv 2304.12824):

        q_ik = softmax_k(-beta d_ik),  logits_ik = clip(-E(c_i, a_ik) / tau, ±50),
        loss = mean_i CE(logits_i, q_i) = -mean_i sum_k q_ik log softmax(logits_i)_k

    d_ik = ||a_ik - a*_i||² (a* itself has d = 0, so it carries the largest target). With `t` (b,)
    every candidate of frame i is noised to t_i (`noise_to_time`, targets from the clean chunks)
    and E is called with t: the time-conditioned energy that guided sampling queries inside the flow.
    `key` draws the noise and the dropout. samples: the policy's K chunks, first `action_dim` dims.
    """
    distances, energies = _candidates_and_energies(model, context, actions, context_mask, samples, t, key, inference)
    targets = jax.nn.softmax(-beta * distances, axis=1)
    logits = _logits(energies, tau)
    loss = jnp.mean(optax.softmax_cross_entropy(logits, targets))
    metrics = _metrics(loss, energies, logits, jnp.zeros(actions.shape[0], jnp.int32))
    return loss, {**metrics, **_selection_metrics(energies, distances, actions.shape[1] * actions.shape[2])}


def policy_ranking(
    model: EnergyModel,
    context: BatchContext,
    actions: BatchActions,
    context_mask: BatchContextMask,
    samples: Float[Array, "b k h a"],
    *,
    tau: float | Float[Array, ""],
    weighted: bool = False,
    key: PRNGKeyArray | None = None,
    inference: bool = False,
) -> tuple[Scalar, Metrics]:
    """Pairwise Bradley-Terry ranking by distance to the expert (RoboMonkey, Kwok et al. 2025,
    arXiv 2506.17811), over every ordered pair of the candidates {a*, K policy samples}:

        loss = sum_{i,j,k} w_ijk softplus(-(E_ik - E_ij) / tau) / sum w_ijk,
        w_ijk = [d_ij < d_ik] (times d_ik - d_ij when `weighted`)

    i.e. -log sigmoid((E_k - E_j)/tau) wherever candidate j is nearer the expert than k.
    Logits in the metrics are clip(-E/tau, ±50).
    """
    distances, energies = _candidates_and_energies(model, context, actions, context_mask, samples, None, key, inference)
    gap = distances[:, None, :] - distances[:, :, None]  # [i, j, k] = d_ik - d_ij
    weights = jnp.where(gap > 0, gap if weighted else 1.0, 0.0)
    margins = (energies[:, None, :] - energies[:, :, None]) / tau  # E_ik - E_ij
    loss = jnp.sum(weights * jax.nn.softplus(-margins)) / jnp.maximum(jnp.sum(weights), 1e-12)
    metrics = _metrics(loss, energies, _logits(energies, tau), jnp.zeros(actions.shape[0], jnp.int32))
    return loss, {**metrics, **_selection_metrics(energies, distances, actions.shape[1] * actions.shape[2])}
