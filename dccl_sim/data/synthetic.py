"""A seeded, vectorized long-tail recommendation data generator (docs/design.md §2).

The world it simulates:

* **Items.** `num_items` items, each in one of `num_categories` categories (balanced, shuffled). Every category
  has a random unit centre; an item's latent vector is its category centre plus a smaller random offset,
  normalized, so items of one category are similar and the category is informative. Item popularity is Zipf:
  ``p_i ∝ 1 / rank_i ** zipf_exponent`` over a random permutation of the items.
* **Users.** Each user (device) belongs to one of `num_clusters` clusters. Their long-term preference is
  ``u = normalize(cluster_centre + personal_deviation * personal_vector)`` with both parts random unit vectors, so
  at ``personal_deviation=1`` the shared and the personal part weigh the same and at 0 all users of a cluster share
  one preference. Each user also drifts: at relative time ``τ ∈ [0, 1]`` of their own timeline (by timestamp,
  first interaction 0, last 1) the preference is ``normalize(u + drift * τ * direction)`` for a random unit
  `direction`, so a user's newest behaviour says something the old does not.
* **Activity.** A user's number of interactions is ``3 + round(LogNormal)``, the log-normal having sigma
  `activity_sigma` and mean ``mean_interactions - 3`` (so the mean is about `mean_interactions` and the minimum
  3), capped at ``max(3, num_items // 2)``: most users have few interactions, a few have very many.
* **Choices.** For each interaction `candidates_per_choice` candidates are drawn from the popularity distribution
  (with replacement; popularity quantized to a table of at least `POPULARITY_SLOTS_PER_ITEM` slots per item) and
  one is picked with probability ∝ ``exp(logit)``, ``logit = PREFERENCE_STRENGTH * sqrt(latent_dim) *
  preference(τ) · item``: the Gumbel-max choice, sampled by inverse CDF instead of with Gumbel noise (the same
  distribution, one exponential per candidate instead of two logarithms). So popularity and preference both shape
  behaviour. **Items never repeat for a user:** an item the user already has gets weight 0; in the rare case that
  every candidate is taken, the pick is drawn from all the user's untaken items with probability
  ∝ ``p_i * exp(logit_i)``. (All of a user's interactions are drawn at once and collisions redrawn, so an early
  interaction's redraw also excludes items the user picks later; see `_choose`.) Every user gets exactly their
  drawn number of interactions, at least 3.
* **Time.** Each user starts at a uniform time within a year after `EPOCH_START` and then acts after gaps of
  ``1 + floor(Exponential(MEAN_GAP_S))`` seconds: timestamps are int64 seconds, *strictly* increasing per user.
  Interactions of different users may share a timestamp.
* **Profiles.** ``segment`` (the cluster id, correct with probability `SEGMENT_ACCURACY`, else uniform over the
  clusters), ``age_group`` (6 values, drawn from a peaked per-cluster distribution: strongly tied to the cluster)
  and ``region`` (10 values, from a flat-ish per-cluster distribution: weakly tied).

Ids: users are ``0..num_devices-1``, items ``0..num_items-1`` (both int64); interactions come user by user, each
user's in time order. Everything is derived from ``np.random.SeedSequence(seed)``: the same seed and config give
identical arrays (with the same numpy on the same kind of CPU: float rounding decides a near-tie now and then).
Users are generated in batches of `BATCH_USERS` (fewer when `num_items` is large), each batch with its own child
seed, so working memory stays small (tens of MB at the default config) besides the output, 24 bytes per
interaction (about 0.5 GB for 10^6 users at the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dccl_sim.config import SyntheticConfig
from dccl_sim.data.raw import DataError, RawDataset
from dccl_sim.progress import Progress

PREFERENCE_STRENGTH = 2.0
"""A choice's logit is ``PREFERENCE_STRENGTH * sqrt(latent_dim) * preference · item`` (both unit vectors): for
unrelated vectors ``sqrt(latent_dim) * u · v`` has standard deviation about 1, so this is about the logits' spread
across items, whatever `latent_dim` is (the inverse of a softmax temperature)."""
ITEM_SPREAD = 0.5
"""Size of an item's own offset relative to its (unit) category centre."""
SEGMENT_ACCURACY = 0.6
"""Probability that the `segment` profile field is the user's true cluster."""
AGE_GROUPS = 6
REGIONS = 10
AGE_CONCENTRATION = 0.5
"""Dirichlet concentration of each cluster's age-group distribution: small, so peaked (strong correlation)."""
REGION_CONCENTRATION = 5.0
"""Dirichlet concentration of each cluster's region distribution: large, so near-uniform (weak correlation)."""
MIN_INTERACTIONS = 3
EPOCH_START = 1_600_000_000
"""Earliest timestamp (2020-09-13, Unix seconds)."""
HORIZON_S = 365 * 86_400
"""Users start uniformly within this many seconds after `EPOCH_START`."""
MEAN_GAP_S = 43_200.0
"""Mean gap between a user's consecutive interactions (half a day)."""
BATCH_USERS = 1000
"""Users per batch (fewer if users × items would pass `BATCH_ELEMENTS`); a batch's arrays stay in cache."""
BATCH_ELEMENTS = 25_000_000
"""Cap on users × items per batch (a batch keeps 8 bytes per user and item: availability and claim stamps)."""
POPULARITY_SLOTS_PER_ITEM = 128
"""Candidates are drawn from a table of at least this many slots per item (popularity quantized to 1/slots)."""


def generate_synthetic(
    config: SyntheticConfig, num_devices: int, seed: int, on_progress: Progress | None = None
) -> RawDataset:
    """Generate `num_devices` users' interactions with `config.num_items` items; see the module docstring.
    `on_progress` hears of every batch of users done."""
    if num_devices < 1:
        raise DataError(f"synthetic: num_devices must be at least 1, got {num_devices}")
    if config.num_items < MIN_INTERACTIONS:
        raise DataError(f"synthetic: num_items must be at least {MIN_INTERACTIONS}, got {config.num_items}")
    item_ss, user_ss, batch_ss = np.random.SeedSequence(seed).spawn(3)
    m, d, k = config.num_items, config.latent_dim, config.num_clusters

    # Items: category centres, item vectors, Zipf popularity and its sampling table.
    rng = np.random.default_rng(item_ss)
    item_category = rng.permutation(np.arange(m) % config.num_categories).astype(np.int64)
    category_centres = _unit(rng.standard_normal((config.num_categories, d)))
    item_vec = _unit(category_centres[item_category] + ITEM_SPREAD * _unit(rng.standard_normal((m, d))))
    popularity = np.empty(m)
    popularity[rng.permutation(m)] = 1.0 / np.arange(1, m + 1, dtype=np.float64) ** config.zipf_exponent
    popularity /= popularity.sum()
    world = _World(
        item_vec=(item_vec * (PREFERENCE_STRENGTH * np.sqrt(d))).astype(np.float32),
        table=_popularity_table(popularity),
        log_popularity=np.log(np.maximum(popularity, 1e-30)).astype(np.float32),
        drift=np.float32(config.drift),
        candidates=config.candidates_per_choice,
    )

    # Users: cluster, activity, start time and profile, all at once (a few arrays of num_devices).
    rng = np.random.default_rng(user_ss)
    cluster_centres = _unit(rng.standard_normal((k, d)))
    cluster = rng.integers(0, k, size=num_devices)
    counts = _activity(rng, config, num_devices)
    starts = EPOCH_START + rng.integers(0, HORIZON_S, size=num_devices)
    noisy = rng.random(num_devices) >= SEGMENT_ACCURACY
    segment = np.where(noisy, rng.integers(0, k, size=num_devices), cluster)
    age_group = _categorical(rng, rng.dirichlet(np.full(AGE_GROUPS, AGE_CONCENTRATION), size=k), cluster)
    region = _categorical(rng, rng.dirichlet(np.full(REGIONS, REGION_CONCENTRATION), size=k), cluster)

    # Interactions, batch by batch of users; each batch has its own child seed.
    ends = np.cumsum(counts)
    user_id = np.repeat(np.arange(num_devices, dtype=np.int64), counts)
    item_id = np.empty(int(ends[-1]), dtype=np.int64)
    timestamp = np.empty(int(ends[-1]), dtype=np.int64)
    batch = min(num_devices, BATCH_USERS, max(1, BATCH_ELEMENTS // m))
    scratch = _Scratch(available=np.ones(batch * m, dtype=np.float32), stamps=np.empty(batch * m, dtype=np.int32))
    bounds = [*range(0, num_devices, batch), num_devices]
    for lo, hi, ss in zip(bounds[:-1], bounds[1:], batch_ss.spawn(len(bounds) - 1), strict=True):
        rng = np.random.default_rng(ss)
        a, b = int(ends[lo] - counts[lo]), int(ends[hi - 1])
        personal = _unit(rng.standard_normal((hi - lo, d)))
        pref = _unit(cluster_centres[cluster[lo:hi]] + config.personal_deviation * personal)
        direction = _unit(rng.standard_normal((hi - lo, d)))
        timestamp[a:b], tau = _timeline(rng, starts[lo:hi], counts[lo:hi])
        item_id[a:b] = _choose(rng, world, scratch, pref, direction, counts[lo:hi], tau)
        if on_progress is not None:
            on_progress("generating data: user", hi, num_devices)

    return RawDataset(
        name="synthetic",
        user_id=user_id,
        item_id=item_id,
        timestamp=timestamp,
        item_ids=np.arange(m, dtype=np.int64),
        item_category=item_category,
        num_categories=config.num_categories,
        user_ids=np.arange(num_devices, dtype=np.int64),
        profiles={
            "segment": segment.astype(np.int64),
            "age_group": age_group.astype(np.int64),
            "region": region.astype(np.int64),
        },
        profile_cardinalities={"segment": k, "age_group": AGE_GROUPS, "region": REGIONS},
    )


@dataclass(frozen=True)
class _World:
    """What every batch's choices need about the items."""

    item_vec: np.ndarray  # (num_items, latent_dim) float32: item vectors times the logit scale
    table: np.ndarray  # popularity sampling table, length a power of two
    log_popularity: np.ndarray  # (num_items,) float32
    drift: np.float32
    candidates: int


@dataclass(frozen=True)
class _Scratch:
    """Per (user of a batch, item) state, reused by every batch: flat arrays indexed ``user * num_items + item``."""

    available: np.ndarray  # float32, all 1 between batches; 0 where the user already has the item
    stamps: np.ndarray  # int32, garbage between uses: settles which interaction keeps an item picked twice


def _unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def _activity(rng: np.random.Generator, config: SyntheticConfig, n: int) -> np.ndarray:
    """Heavy-tailed interaction counts: 3 + rounded log-normal with mean `mean_interactions - 3`, capped."""
    cap = max(MIN_INTERACTIONS, config.num_items // 2)
    extra_mean = config.mean_interactions - MIN_INTERACTIONS
    if extra_mean <= 0:
        return np.full(n, MIN_INTERACTIONS, dtype=np.int64)
    sigma = config.activity_sigma
    extra = rng.lognormal(np.log(extra_mean) - sigma**2 / 2, sigma, size=n)
    return np.minimum(MIN_INTERACTIONS + np.rint(extra).astype(np.int64), cap)


def _categorical(rng: np.random.Generator, probs: np.ndarray, group: np.ndarray) -> np.ndarray:
    """One draw per user from the distribution `probs[group[u]]`."""
    cdf = np.cumsum(probs, axis=1)
    u = rng.random(len(group))[:, None] * cdf[group, -1:]
    return np.minimum((cdf[group] <= u).sum(axis=1), probs.shape[1] - 1)


def _popularity_table(p: np.ndarray) -> np.ndarray:
    """A table of 2**bits item ids, item i in about p[i] * 2**bits slots: a uniform slot is a popularity draw.

    Every item gets at least one slot (so any item can be a candidate); items below one slot are raised to one and
    the others scaled down in proportion, then rounded by largest remainder. With at least
    `POPULARITY_SLOTS_PER_ITEM` slots per item, the table is within total variation 1/`POPULARITY_SLOTS_PER_ITEM`
    of `p`; a table lookup is much faster than an inverse-CDF search.
    """
    m = len(p)
    size = 1 << max(16, int(np.ceil(np.log2(m * POPULARITY_SLOTS_PER_ITEM))))
    floor_one = np.zeros(m, dtype=bool)
    while True:  # raising items to one slot shrinks the others' share, which may push more below one
        rest = size - int(floor_one.sum())
        raw = np.where(floor_one, 1.0, p * (rest / p[~floor_one].sum()))
        if not (below := raw < 1.0).any():
            break
        floor_one |= below
    slots = np.floor(raw).astype(np.int64)
    slots[np.argsort(slots - raw, kind="stable")[: size - int(slots.sum())]] += 1  # the largest remainders
    return np.repeat(np.arange(m, dtype=np.int16 if m <= np.iinfo(np.int16).max else np.int32), slots)


def _timeline(rng: np.random.Generator, starts: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Strictly increasing int64 timestamps per user and each interaction's relative time τ ∈ [0, 1] (float32)."""
    total = int(counts.sum())
    first = np.cumsum(counts) - counts
    gaps = 1 + rng.exponential(MEAN_GAP_S, size=total).astype(np.int64)
    gaps[first] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= np.repeat(elapsed[first], counts)
    span = np.repeat(elapsed[first + counts - 1], counts)
    return np.repeat(starts, counts) + elapsed, (elapsed / span).astype(np.float32)


def _choose(
    rng: np.random.Generator,
    world: _World,
    scratch: _Scratch,
    pref: np.ndarray,
    direction: np.ndarray,
    counts: np.ndarray,
    tau: np.ndarray,
) -> np.ndarray:
    """The items chosen by one batch of users (user-major, in time order), never repeating an item for a user.

    Each interaction gets its preference vector (drifted to its τ, scaled to logits); a candidate's logit is a dot
    product with the item's vector. All pending interactions are drawn at once; when one user picked the same item
    at several interactions, one of them keeps it and the others are drawn again in the next round, with the items
    the user has by then taken out. Each round settles at least one interaction per pending user. Arrays are
    (candidates × interactions) so that the cumulative sums run over contiguous rows. No BLAS call: its threads
    only slow these small products down on a busy machine.
    """
    m, cands = len(world.item_vec), world.candidates
    available, stamps = scratch.available, scratch.stamps
    rows = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    # At relative time τ the preference is (u + shift·dir) / |u + shift·dir| with shift = drift·τ, u and dir unit.
    pref, direction = pref.astype(np.float32), direction.astype(np.float32)
    shift = world.drift * tau
    cos = np.einsum("ij,ij->i", pref, direction)
    weight = 1.0 / np.sqrt(1.0 + 2.0 * shift * np.take(cos, rows) + shift * shift)
    prefs = np.take(pref, rows, axis=0) * weight[:, None]
    prefs += np.take(direction, rows, axis=0) * (shift * weight)[:, None]
    table_shift = 32 - (len(world.table).bit_length() - 1)

    chosen_all = np.empty(len(rows), dtype=np.int64)
    pending = np.arange(len(rows))
    while pending.size:
        n = pending.size
        base = rows[pending] * m
        p = np.take(prefs, pending, axis=0)
        # np.take rather than fancy indexing: several times faster for these gathers
        cand = np.take(world.table, rng.integers(0, 1 << 32, size=(cands, n), dtype=np.uint32) >> table_shift)
        w = np.einsum("knd,nd->kn", np.take(world.item_vec, cand, axis=0), p)
        np.exp(w, out=w)
        if pending.size < len(rows):  # nothing is taken before the first round
            w *= np.take(available, base + cand)
        cum = np.cumsum(w, axis=0, out=w)
        threshold = rng.random(n, dtype=np.float32) * cum[-1]
        pick = np.count_nonzero(cum <= threshold, axis=0)
        stuck = np.flatnonzero(pick >= cands)  # every candidate already taken (or a rounding edge)
        pick[stuck] = 0
        chosen = cand[pick, np.arange(n)].astype(np.int64)
        if stuck.size:  # draw from all the user's untaken items, weighted by popularity × exp(logit)
            full = np.einsum("sd,md->sm", p[stuck], world.item_vec) + world.log_popularity
            full -= np.log(-np.log(rng.random(full.shape, dtype=np.float32) + np.float32(1e-12)))  # Gumbel
            full[available.reshape(-1, m)[rows[pending[stuck]]] == 0] = -np.inf
            chosen[stuck] = np.argmax(full, axis=1)
        keys = base + chosen
        stamp = np.arange(n, dtype=np.int32)
        stamps[keys[::-1]] = stamp[::-1]  # one stamp survives per (user, item): that interaction keeps the item
        won = stamps[keys] == stamp
        available[keys] = 0.0
        chosen_all[pending[won]] = chosen[won]
        pending = pending[~won]
    available[rows * m + chosen_all] = 1.0  # clean for the next batch
    return chosen_all
