"""Partial FC (docs/methods.md §3.12): a margin head whose class centres are sharded across ranks.

Each rank holds a contiguous block of classes. Embeddings and labels are all-gathered, so every rank
scores the whole global batch against its own centres; the softmax cross-entropy is computed across the
shards (all-reduced max and sum of exponentials). With ``sample_rate < 1`` a rank scores only the centres
of the positive classes in the global batch plus random negatives, up to ``sample_rate * local classes``.

Any registered margin head works inside: per-sample statistics (AdaFace's norm EMA, CurricularFace's t)
are computed from the global batch, so they equal the single-process values. The loss and its gradients
are those of the mean cross-entropy over the global batch: with ``sample_rate = 1`` they equal a single
process holding all classes (tested with 2 gloo ranks). Each rank's backbone gradient is then that of the
global loss through its own samples, so a DDP loop must *sum* them over ranks
(``core.distributed.register_sum_hook``), not average them.

``interclass_filtering_threshold > 0`` is arcface_torch's inter-class filtering (robust Partial FC,
``CombinedMarginLoss`` in losses.py, default 0 = off): a non-target cosine above the threshold is taken for
a label-noise duplicate of the sample's own identity and replaced by 0 with no gradient, before the head's
margin, so its logit is 0 and this sample does not push that class away (miners see the same zeroed
cosine).

``state_dict`` is unsharded (every rank must call it: rank 0 gathers the shards, receiving each into one
tensor, and the other ranks hold only their own) and ``load_state_dict`` takes an unsharded one, of which
each rank reads its rows, so a checkpoint moves between world sizes; read with ``mmap``
(``core.checkpoint.load_checkpoint``), no rank reads more of the file than its rows.

What miners need comes back from :meth:`PartialFC.scores` as values (the target cosines of the global batch;
on request the shard's cosines, which :meth:`PartialFC.top_negatives` ranks across shards): the class keeps
no state of the last batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from core.distributed import (
    all_gather_padded,
    all_gather_with_grad,
    all_reduce,
    gather_rows_to_rank0,
    get_rank,
    get_world_size,
)
from heads.margin import MarginHead, check_inputs, compute_dtype, init_centres
from heads.registry import HEADS


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """(first class, number of classes) held by ``rank``: contiguous blocks differing by at most one."""
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, base + (rank < extra)


class _ShardedCrossEntropy(torch.autograd.Function):
    """Per-sample softmax cross-entropy (N,) over logits split by columns across ranks.

    ``labels`` are local column indices, -1 where the class lives on another rank. Every rank returns the
    same vector; backward gives the exact gradient (softmax - onehot) * dL/dCE_i for this rank's columns.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = logits.detach()
        row_max = all_reduce(logits.max(dim=1).values, "max")
        exp = torch.exp(logits - row_max.unsqueeze(1))
        denom = all_reduce(exp.sum(dim=1), "sum")
        prob = exp / denom.unsqueeze(1)
        # in log space: a target probability far below the float range must not clamp the loss
        here = labels >= 0
        target_logit = torch.where(here, logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
        target_logit = all_reduce(target_logit, "sum")
        ctx.save_for_backward(prob, labels)
        return torch.log(denom) + row_max - target_logit

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        prob, labels = ctx.saved_tensors
        rows = torch.nonzero(labels >= 0).squeeze(1)
        grad_logits = prob.clone()
        grad_logits[rows, labels[rows]] -= 1.0
        return grad_logits * grad.unsqueeze(1), None


class ShardCosines(NamedTuple):
    """This rank's cosines of a global batch, as :meth:`PartialFC.top_negatives` reads them."""

    cos: torch.Tensor  # (N global, scored local classes), detached
    local: torch.Tensor  # (N global,) column of each sample's class here, -1 where it lives on another rank
    index: torch.Tensor | None  # local class of each column (None: every local class, in order)


class BatchScores(NamedTuple):
    """What :meth:`PartialFC.scores` gives for a global batch, the same on every rank except ``cosines``
    and ``index`` (this rank's shard)."""

    ce: torch.Tensor  # (N global,) per-sample cross-entropy, rank r's samples r-th
    labels: torch.Tensor  # (N global,) their labels
    target_cos: torch.Tensor  # (N global,) cos(theta_y) of each sample, detached (difficulty scores)
    index: torch.Tensor | None  # local classes scored (sample_rate < 1 in training), else None
    cosines: ShardCosines | None  # with ``keep_cosines``: for top_negatives (mining)


class PartialFC(nn.Module):
    """``forward(embeddings, labels) -> loss`` for the local batch, with the head's centres sharded.

    Args:
        head: name of a registered margin head; ``head_params`` go to its constructor.
        embedding_size, num_classes: of the whole classifier.
        sample_rate: fraction of this rank's classes scored per step (positives are always kept).
        init_seed: draw the initial centres (the head's ``init``) per block of classes from this seed, so
            the classifier starts the same at any world size; None keeps the head's own draw.
        interclass_filtering_threshold: non-target cosines above it are zeroed (0 = off, arcface_torch's
            default; its noisy-WebFace12M configs use 0.4).
    """

    INIT_BLOCK = 4096  # classes per independently seeded block of the initial centres

    def __init__(
        self,
        head: str,
        embedding_size: int,
        num_classes: int,
        sample_rate: float = 1.0,
        init_seed: int | None = None,
        interclass_filtering_threshold: float = 0.0,
        **head_params: Any,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if not 0.0 <= interclass_filtering_threshold < 1.0:
            raise ValueError(
                f"interclass_filtering_threshold must be in [0, 1) (0 turns the filter off), "
                f"got {interclass_filtering_threshold}"
            )
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.embedding_size, self.num_classes, self.sample_rate = embedding_size, num_classes, sample_rate
        self.rank, self.world_size = get_rank(), get_world_size()
        self.class_start, self.num_local = shard_range(num_classes, self.rank, self.world_size)
        if self.num_local == 0:
            raise ValueError(f"{num_classes} classes cannot be sharded over {self.world_size} ranks")
        self.head: MarginHead = HEADS.build(
            head, embedding_size=embedding_size, num_classes=self.num_local, **head_params
        )
        if init_seed is not None:
            self._init_shard(init_seed)

    @torch.no_grad()
    def _init_shard(self, seed: int) -> None:
        """Centres drawn with the head's ``init`` per block of classes from ``(seed, block)``: the classifier
        starts the same whatever the number of ranks, and no rank ever draws more than its own blocks."""
        first, last = self.class_start, self.class_start + self.num_local
        for block in range(first // self.INIT_BLOCK, (last - 1) // self.INIT_BLOCK + 1):
            g = torch.Generator().manual_seed(seed * 1_000_003 + block)
            lo = block * self.INIT_BLOCK
            rows = init_centres(torch.empty(self.INIT_BLOCK, self.embedding_size), self.head.init, g)
            a, b = max(first, lo), min(last, lo + self.INIT_BLOCK)
            self.head.weight[a - first : b - first] = rows[a - lo : b - lo]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the global batch."""
        return self.scores(embeddings, labels).ce.mean()

    def per_sample_ce(
        self, embeddings: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of every sample of the global batch, their labels): :meth:`scores`' first two."""
        out = self.scores(embeddings, labels)
        return out.ce, out.labels

    def scores(
        self, embeddings: torch.Tensor, labels: torch.Tensor, keep_cosines: bool = False
    ) -> BatchScores:
        """The per-sample cross-entropy of every sample of the global batch, their labels and target
        cosines, the same on every rank (rank r's samples come r-th); with ``keep_cosines`` also this
        shard's cosines for :meth:`top_negatives`. Any function of the cross-entropy vector (focal, FRABSM
        weight) has exact gradients for the centres of this shard and for every rank's embeddings."""
        # Non-finite embeddings pass: gathered, they make the cross-entropy NaN on every rank alike, and the
        # training loop skips the step everywhere (an error here, on one rank, would leave the others
        # waiting in the all-gather, and would stop the run before train.max_bad_steps can act).
        check_inputs("PartialFC", embeddings, labels, self.embedding_size, self.num_classes, finite=False)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            all_embeddings = all_gather_with_grad(embeddings.to(compute_dtype(embeddings)))
            all_labels = torch.cat(all_gather_padded(labels))
            local = all_labels - self.class_start
            local = torch.where((local >= 0) & (local < self.num_local), local, -1)
            weight = self.head.weight
            if self.sample_rate < 1.0 and self.training:
                index, local = self._sample(local)
                weight = weight[index]
            else:
                index = None
            cos = self.head.cosine(all_embeddings, weight)
            if self.interclass_filtering_threshold > 0:
                cos = self._filter_interclass(cos, local)
            cosines = ShardCosines(cos.detach(), local, index) if keep_cosines else None
            here = local >= 0
            cos_y_all = torch.where(here, self.head.target_cos(cos, local).detach(), 0.0)
            cos_y_all = all_reduce(cos_y_all, "sum")
            logits = self.head.logits(cos, local, all_embeddings.norm(dim=1), cos_y_all)
            ce = _ShardedCrossEntropy.apply(logits, local)
            return BatchScores(ce, all_labels, cos_y_all, index, cosines)

    def _filter_interclass(self, cos: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """``cos`` with every non-target entry above the threshold multiplied by 0 (a constant mask, so no
        gradient flows through those entries). A sample whose class lives on another rank has no target
        column here, so all its entries are candidates."""
        with torch.no_grad():
            target = torch.arange(cos.shape[1], device=cos.device) == local.unsqueeze(1)
            keep = (cos <= self.interclass_filtering_threshold) | target
        return cos * keep.to(cos.dtype)

    def _sample(self, local: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Local class indices to score (all positives + random negatives) and the labels remapped."""
        positives = torch.unique(local[local >= 0])
        keep = max(int(self.sample_rate * self.num_local), positives.numel())
        scores = torch.rand(self.num_local, device=local.device)
        scores[positives] = 2.0  # above every random score: positives are always chosen
        index = torch.topk(scores, keep).indices.sort().values
        remap = torch.full((self.num_local,), -1, dtype=torch.long, device=local.device)
        remap[index] = torch.arange(keep, device=local.device)
        return index, torch.where(local >= 0, remap[local.clamp(min=0)], -1)

    # -- mining -------------------------------------------------------------------------------------

    @torch.no_grad()
    def top_negatives(self, cosines: ShardCosines, k: int) -> torch.Tensor:
        """(N global, k) ids of the k non-target classes with the highest cosine for each sample of the
        global batch whose ``cosines`` :meth:`scores` kept, ranked across all shards (-1 pads when fewer
        classes exist). Every rank must call it."""
        cos, local, index = cosines
        cos = cos.clone()
        rows = torch.nonzero(local >= 0).squeeze(1)
        cos[rows, local[rows]] = float("-inf")  # not the target class
        take = min(k, cos.shape[1])
        values, columns = cos.topk(take, dim=1)
        ids = (columns if index is None else index[columns]) + self.class_start
        if take < k:  # every rank contributes k columns, so the gathered blocks line up
            pad = k - take
            values = torch.cat([values, values.new_full((len(values), pad), float("-inf"))], dim=1)
            ids = torch.cat([ids, ids.new_full((len(ids), pad), -1)], dim=1)
        all_values = torch.cat(all_gather_padded(values.T.contiguous())).T  # (N, k * world)
        all_ids = torch.cat(all_gather_padded(ids.T.contiguous())).T
        best = all_values.topk(k, dim=1).indices
        return torch.where(torch.isfinite(all_values.gather(1, best)), all_ids.gather(1, best), -1)

    @torch.no_grad()
    def gather_centres(self, ids: torch.Tensor) -> torch.Tensor:
        """Class centres (len(ids), E) of global class ``ids``, wherever they live (every rank must call)."""
        requests = all_gather_padded(ids.to(self.head.weight.device, torch.long))
        answers = []
        for request in requests:  # each rank fills in the rows it owns, the sum assembles them
            rows = torch.zeros(len(request), self.embedding_size, device=self.head.weight.device)
            mine = (request >= self.class_start) & (request < self.class_start + self.num_local)
            rows[mine] = self.head.weight[request[mine] - self.class_start].float()
            answers.append(rows)
        total = all_reduce(torch.cat(answers), "sum")
        start = sum(len(r) for r in requests[: get_rank()])
        return total[start : start + len(ids)]

    # -- unsharded checkpoints ----------------------------------------------------------------------

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        """Unsharded: ``weight`` holds all classes; head buffers are the same on every rank. Every rank must
        call it: under several processes rank 0 alone assembles ``weight`` (in host memory, receiving each
        shard into it: :func:`core.distributed.gather_rows_to_rank0`) and the other ranks get a tensor of
        the same shape on the ``meta`` device (no data), so no rank but 0 ever holds more than its shard."""
        state = {k: v.detach().clone() for k, v in self.head.state_dict().items() if k != "weight"}
        state["weight"] = self._unsharded(self.head.weight)
        return state

    def _unsharded(self, shard: torch.Tensor) -> torch.Tensor:
        """All classes' rows of ``shard`` (this rank's rows of a per-class tensor), as :meth:`state_dict`
        gives them."""
        full = gather_rows_to_rank0(shard)  # one process: a copy (file-backed when large, core.spill)
        if full is None:
            return torch.empty((self.num_classes, *shard.shape[1:]), dtype=shard.dtype, device="meta")
        return full

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load an unsharded state dict (from any world size): this rank takes its block of classes."""
        full = state_dict["weight"]
        if tuple(full.shape) != (self.num_classes, self.embedding_size):
            raise ValueError(
                f"PartialFC: checkpoint weight of shape {tuple(full.shape)}, "
                f"expected ({self.num_classes}, {self.embedding_size})"
            )
        local = dict(state_dict)
        local["weight"] = full[self.class_start : self.class_start + self.num_local]  # reads only these rows
        return self.head.load_state_dict(local, strict=strict, assign=assign)

    # -- optimizer state of the shard ---------------------------------------------------------------

    def optimizer_state_dict(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with the per-class state of the centres (momentum, Adam moments)
        gathered to all classes, so it loads at any world size (every rank must call it; as in
        :meth:`state_dict`, rank 0 alone assembles them, the others get ``meta`` tensors)."""
        state = optimizer.state_dict()
        state["state"] = {k: dict(v) for k, v in state["state"].items()}  # never touch the live state
        for index in self._weight_indices(optimizer):
            per_param = state["state"].get(index, {})
            for key, value in per_param.items():
                if torch.is_tensor(value) and value.shape[:1] == (self.num_local,):
                    per_param[key] = self._unsharded(value)
        return state

    def load_optimizer_state_dict(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load an unsharded state from :meth:`optimizer_state_dict`: this rank takes its classes."""
        state = {
            "state": {k: dict(v) for k, v in state["state"].items()},
            "param_groups": state["param_groups"],
        }
        for index in self._weight_indices(optimizer):
            for key, value in state["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.shape[:1] == (self.num_classes,):
                    rows = value[self.class_start : self.class_start + self.num_local]
                    state["state"][index][key] = rows.clone()  # its own memory, not a view of the file
        optimizer.load_state_dict(state)

    def _weight_indices(self, optimizer: torch.optim.Optimizer) -> list[int]:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return [i for i, p in enumerate(params) if p is self.head.weight]
