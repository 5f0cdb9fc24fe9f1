"""The DRT model (and its sliding-window-only and full-attention baselines).

    cfg = DRTConfig.from_preset("tiny")
    model = DRT(cfg)
    out = model(input_ids, labels=input_ids, output_retrieval=True)
    out.logits   # (B, L, vocab), row t predicts token t + 1
    out.loss     # mean cross-entropy of logits[:, :-1] against labels[:, 1:]
    out.retrieval[g].indices  # (B, C, K), K = min(top_k, C): chunks retrieved at chunk c's landmark, all < c or -1

Layout inside the model. The user's L tokens are cut into C = ceil(L / P) chunks of
P = chunk_size - 1 tokens and a landmark is appended to each, so chunk c occupies positions
[c*S, (c+1)*S) with S = chunk_size and its landmark at c*S + S - 1. A partial last chunk is
padded after the user's tokens (causality keeps the pad invisible to them) and has no landmark.
The logit for the user's token t is read at the position just before token t + 1: the token's
own position, or for the last token of a chunk, the landmark that follows it.

    lower layers (sliding window)  ->  chunk encoder  ->  for each group:
        retrieve with RMSNorm_g(h at landmarks)  ->  layers of [window attn, GCA, MLP]
    -> final norm -> tied LM head
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gca.config import DRTConfig, _is_int, check_counts, integer_dtype
from gca.inference.cache import ChunkMemory, DRTCache, RingKV
from gca.nn.layers import ChunkEncoder, DecoderLayer, RMSNorm, UpperLayer, rope_cos_sin
from gca.ops.gca_ref import values_readable
from gca.retrieval import Retrieval, causal_topk, copy_retrieval_loss, copy_targets, retrieval_scores, shift_to_queries


@dataclass
class DRTOutput:
    logits: torch.Tensor  # (B, L, vocab)
    loss: torch.Tensor | None = None
    retrieval: list[Retrieval] | None = None  # one entry per retrieval group
    # in training with labels and config.retrieval_copy_loss > 0: the auxiliary retrieval loss (mean over
    # groups, unweighted; `loss` holds it times the weight) and the share of rows that had a target
    retrieval_loss: torch.Tensor | None = None
    retrieval_rows: torch.Tensor | None = None


# pytree nodes, so that torch.export (and anything else walking outputs) sees the tensors inside
torch.export.register_dataclass(DRTOutput, serialized_type_name="gca.model.DRTOutput")
torch.export.register_dataclass(Retrieval, serialized_type_name="gca.retrieval.Retrieval")

# the residual branches' output projections (module names), initialised with std init_std / sqrt(2 x layers)
RESIDUAL_PROJECTIONS = ("attn.o", "mlp.down", "gca.o")


def labelled_tokens(labels: torch.Tensor) -> int:
    """How many labels ``DRT.forward``'s loss averages over: each position's next label that is not -100."""
    return int((labels[:, 1:] != -100).sum())


class DRT(nn.Module):
    """A DRT language model; ``cfg.arch`` selects DRT or one of the two baselines."""

    def __init__(self, config: DRTConfig):
        super().__init__()
        if not isinstance(config, DRTConfig):
            raise TypeError(f"DRT expects a DRTConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        self.gradient_checkpointing = False
        # rows: the vocabulary, the landmark id (DRT), then padding to a multiple of 64 so the tied
        # LM head's matrix product runs on aligned tensor-core kernels (an odd 50257 does not)
        n_emb = cfg.vocab_size + (1 if cfg.arch == "drt" else 0)
        self.embed = nn.Embedding(-(-n_emb // 64) * 64, cfg.hidden_size)
        if cfg.arch == "drt":
            self.lower = nn.ModuleList(DecoderLayer(cfg, cfg.window) for _ in range(cfg.num_lower_layers))
            self.encoder = ChunkEncoder(cfg)
            self.retr_norms = nn.ModuleList(RMSNorm(cfg.hidden_size, cfg.norm_eps) for _ in cfg.upper_groups)
            self.groups = nn.ModuleList(
                nn.ModuleList(UpperLayer(cfg) for _ in range(n)) for n in cfg.upper_groups
            )
        else:
            window = cfg.window if cfg.arch == "swa" else None
            self.lower = nn.ModuleList(DecoderLayer(cfg, window) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise every parameter as a new model is: linear and embedding weights ``normal(0, init_std)``,
        the residual branches' output projections with the std divided by ``sqrt(2 x layers)`` (GPT-2 style),
        norm weights 1, the memory-key shift 0.5. For a model built on the meta device:

            with torch.device("meta"):
                model = DRT(cfg)
            model.to_empty(device="cuda")
            model.reset_parameters()  # on the model itself: nn.Linear's own reset_parameters is another init
        """
        cfg = self.config
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.removesuffix(".weight").endswith(RESIDUAL_PROJECTIONS):
                nn.init.normal_(p, std=cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        with torch.no_grad():  # (set at construction too; after to_empty they hold whatever memory was there)
            for m in self.modules():
                if isinstance(m, RMSNorm):
                    m.weight.fill_(1.0)
                elif getattr(m, "key_shift", None) is not None and isinstance(m.key_shift, nn.Parameter):
                    m.key_shift.fill_(0.5)

    @contextlib.contextmanager
    def gca_disabled(self):
        """Within the block every GCA adds nothing, as if all retrieval weights were 0: the model is
        its sliding window and MLPs alone (retrieval still runs). The loss with GCA off minus the loss
        with it on is what reading retrieved chunks is worth (the trainer logs it as ``val_gca_gain``).

            with model.gca_disabled():
                loss_off = model(ids, labels=ids).loss
        """
        if self.config.arch != "drt":
            raise ValueError(f"a {self.config.arch!r} model has no GCA to disable")
        layers = [layer for group in self.groups for layer in group]
        before = [layer.gca_enabled for layer in layers]
        for layer in layers:
            layer.gca_enabled = False
        try:
            yield self
        finally:
            for layer, b in zip(layers, before):
                layer.gca_enabled = b

    def _init(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def export_lengths(self) -> tuple[int, int]:
        """``(step, shortest)``: the input lengths :meth:`export`'s program takes are the multiples of ``step``
        from ``shortest`` on. A DRT's internal length (chunks of ``chunk_size``, landmarks included) must fill
        whole sliding-window blocks, so its step is the text of ``lcm(window, chunk_size) / chunk_size``
        chunks; the baselines take whole chunks of ``text_per_chunk`` tokens. The shortest is longer than
        the window (shorter inputs take another path, which the traced graph does not hold) and than one
        FlexAttention block (on CUDA the window runs on FlexAttention, and a traced graph of two or more
        blocks does not hold one)."""
        from gca.ops.sliding_window import FLEX_BLOCK

        cfg = self.config
        P = cfg.text_per_chunk
        if cfg.arch == "full" or cfg.window is None:
            return P, P
        if cfg.arch == "drt":
            inner = math.lcm(cfg.window, cfg.chunk_size)  # internal positions (landmarks included) a step
            step = P * (inner // cfg.chunk_size)
            return step, step * max(2, FLEX_BLOCK // inner + 1)
        return P, P * (max(cfg.window, FLEX_BLOCK) // P + 1)

    def export(self, input_ids: torch.Tensor, *, max_length: int | None = None, dynamic_batch: bool = True):
        """``torch.export.export`` of the plain forward (``model(ids).logits``) with the length dynamic: the
        program takes ``(B, L)`` ids for every L that :meth:`export_lengths` allows, up to ``max_length``
        (and any batch size with ``dynamic_batch``); other lengths are not promised (a DRT's program refuses
        them: its guards fail). Pad shorter or unaligned inputs to such a length and read the logits of
        your own positions (the model is causal: padding after them changes nothing before).

        ``input_ids``: the example traced, of an allowed length. Returns the ``ExportedProgram``
        (``.module()(ids).logits`` gives the logits)."""
        ids = self._check_ids(input_ids)
        step, shortest = self.export_lengths()
        L = ids.shape[1]
        if L % step or L < shortest:
            raise ValueError(f"export traces lengths that are multiples of {step} tokens from {shortest} on (this "
                             f"model's export_lengths()); got an example of {L} tokens: pad it to, e.g., "
                             f"{max(shortest, -(-L // step) * step)}")
        if max_length is not None and (not _is_int(max_length) or max_length < L):
            raise ValueError(f"max_length must be an integer >= the example's length {L}, got {max_length!r}")
        n = torch.export.Dim("steps", min=shortest // step,
                             **({"max": max_length // step} if max_length is not None else {}))
        dims = {1: step * n}
        if dynamic_batch:
            dims[0] = torch.export.Dim("batch", min=1)
        return torch.export.export(self, (ids,), dynamic_shapes=(dims,))

    # ---- input handling ----
    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids", allow_ignore: bool = False) -> torch.Tensor:
        """``input_ids`` as torch.long (any integer dtype is taken), after checking type, shape and range."""
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if not integer_dtype(input_ids.dtype):
            raise ValueError(f"{name} must be an integer tensor (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        if input_ids.dtype != torch.long:  # int32 from a tokenizer, uint16 from a prepared dataset's memmap
            input_ids = input_ids.long()
        V = self.config.vocab_size
        allowed = lambda: f"[0, {V})" + (" or -100 (ignored)" if allow_ignore else "")  # (built for a message only)
        if torch.compiler.is_compiling():
            # reading the values back would break the graph; an id past the vocabulary would read past the
            # embedding (or, for a DRT, the landmark's row at id vocab_size), so the graph checks on the device:
            # a RuntimeError on a CPU, a device-side assert on CUDA
            ok = (input_ids >= 0) | (input_ids == -100) if allow_ignore else input_ids >= 0
            torch._assert_async((ok & (input_ids < V)).all(), f"{name} must lie in {allowed()}")
            return input_ids
        if not values_readable(input_ids):
            return input_ids  # no values (meta or fake tensors); shapes were checked
        lo, hi = (int(v) for v in torch.aminmax(input_ids))  # one device sync for both
        if hi >= V or (lo < 0 and not (allow_ignore and lo == -100 and (input_ids[input_ids < 0] == -100).all())):
            raise ValueError(f"{name} must lie in {allowed()}; got values in [{lo}, {hi}]")
        return input_ids

    def _layer(self, layer, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(layer, *args, use_reentrant=False)
        return layer(*args)

    # ---- forward ----
    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_retrieval: bool = False,
        cache: DRTCache | None = None,
        logits_to_keep: int | None = None,
    ) -> DRTOutput:
        """Args:
            input_ids: ``(B, L)`` token ids in ``[0, vocab_size)``, any L >= 1.
            labels: optional ``(B, L)`` ids (usually ``input_ids``); -100 is ignored. The loss is the
                mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``.
            output_retrieval: also return each group's retrieval (DRT only; not with a cache).
            cache: a :class:`DRTCache` from :meth:`new_cache`; the tokens continue the cached
                sequence and only their logits are returned (no loss). Concatenated over any
                split of a sequence, they equal one full forward pass.
            logits_to_keep: return only the logits of the last ``logits_to_keep`` (new) tokens (a 16M-token
                prefill needs one logit row, not 16M); not with ``labels``.
        """
        input_ids = self._check_ids(input_ids)
        if logits_to_keep is not None:  # before the cache's path too (1.5 failed there with a TypeError)
            check_counts("forward", logits_to_keep=logits_to_keep)
        if cache is not None:
            if labels is not None or output_retrieval:
                raise ValueError("labels and output_retrieval are not supported with a cache")
            return DRTOutput(logits=self._forward_cached(input_ids, cache, logits_to_keep))
        if labels is not None:
            labels = self._check_ids(labels, "labels", allow_ignore=True)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            if input_ids.shape[1] < 2:
                raise ValueError("a loss needs at least 2 tokens per sequence (labels are shifted by one)")
        copy = None
        if self.config.arch == "drt":
            train = labels is not None and self.training
            h, retrieval, copy = self._forward_drt(
                input_ids, copy_loss=train and self.config.retrieval_copy_loss > 0,
                copy_force=self.config.retrieval_copy_force if train else 0.0,
            )
        else:
            h, retrieval = self._forward_baseline(input_ids), None
        if logits_to_keep is not None:  # without a cache too: the last rows' logits only (was ignored)
            if labels is not None:
                raise ValueError("logits_to_keep and labels: the loss needs every position's logits")
            h = h[:, -logits_to_keep:]
        logits = self._logits(self.norm(h))
        loss = None
        if labels is not None:
            # every row against the next label, the last row against -100 (ignored): the same mean as
            # logits[:, :-1] against labels[:, 1:], without slicing the (B, L, vocab) logits, whose
            # backward would write a zero-padded copy of them (5 ms of a 64K-token step on an H200)
            target = F.pad(labels[:, 1:], (0, 1), value=-100)
            # the sum over the counted labels by their count, at least 1: the mean where any label counts, and
            # 0 (no gradient) where none does, where the mean was NaN (a batch of answer-only rows with no
            # answer in it); no device sync, so nothing breaks a compiled graph
            counted = (target != -100).sum().clamp(min=1)
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32)),
                target.reshape(-1), ignore_index=-100, reduction="sum"
            ) / counted
            if copy is not None:
                loss = loss + self.config.retrieval_copy_loss * copy[0]
        return DRTOutput(logits=logits, loss=loss, retrieval=retrieval if output_retrieval else None,
                         retrieval_loss=None if copy is None else copy[0],
                         retrieval_rows=None if copy is None else copy[1])

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.embed.weight)[..., : self.config.vocab_size]

    def _rope(self, T: int, device, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(start, start + T, device=device)
        cos, sin = rope_cos_sin(pos, self.config.head_dim, self.config.rope_theta)
        dt = torch.promote_types(self.embed.weight.dtype, torch.float32)
        return cos.to(dt), sin.to(dt)

    def _forward_baseline(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        cos, sin = self._rope(h.shape[1], h.device)
        for layer in self.lower:
            h = self._layer(layer, h, cos, sin)
        return h

    def insert_landmarks(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) user ids -> (B, C*S) model ids with landmarks, and the (L,) positions whose outputs
        are the user's logits."""
        cfg = self.config
        B, L = input_ids.shape
        P, S = cfg.text_per_chunk, cfg.chunk_size
        C = -(-L // P)
        ids = F.pad(input_ids, (0, C * P - L)).view(B, C, P)
        lmk = torch.full((B, C, 1), cfg.landmark_id, dtype=ids.dtype, device=ids.device)
        ids = torch.cat([ids, lmk], dim=2).view(B, C * S)
        t = torch.arange(L, device=ids.device)
        pos = (t // P) * S + t % P + (t % P == P - 1).long()  # last token of a chunk -> its landmark
        return ids, pos

    def _forward_drt(self, input_ids: torch.Tensor, copy_loss: bool = False, copy_force: float = 0.0):
        """-> the upper layers' output, each group's retrieval, and with ``copy_loss`` the auxiliary
        retrieval loss and its share of rows (:func:`copy_retrieval_loss`; else None). ``copy_force``:
        the share of rows whose picks start with their copy targets (``retrieval_copy_force``)."""
        cfg = self.config
        B, L = input_ids.shape
        S = cfg.chunk_size
        ids, out_pos = self.insert_landmarks(input_ids)
        C = ids.shape[1] // S
        h = self.embed(ids)  # (B, T, d)
        cos, sin = self._rope(h.shape[1], h.device)
        for layer in self.lower:
            h = self._layer(layer, h, cos, sin)
        lmk, mem_k, mem_v = self._layer(self.encoder, h.view(B, C, S, -1))  # (B,C,d), (B,C,S,Hk,D) x2
        has_landmark = torch.arange(C, device=h.device) < L // cfg.text_per_chunk  # partial chunk: none
        n_other = cfg.retrieval_distractors if self.training else 0
        if n_other:
            lmk, mem_k, mem_v = self._with_distractors(lmk, mem_k, mem_v, n_other)
        retrieval, copy, force = [], None, None
        if copy_loss or copy_force > 0:
            targets = copy_targets(input_ids, cfg.retrieval_copy_ngram, cfg.text_per_chunk, cfg.window)
            if cfg.retrieval_copy_targets == "other-sequence":  # the control: real targets, another row's text
                if B < 2:
                    raise ValueError("retrieval_copy_targets='other-sequence' needs a training batch of 2 or more sequences")
                targets = targets.roll(-1, 0)
            copy = [] if copy_loss else None
            if copy_force > 0:  # the rows drawn, their targets over the whole memory (other sequences first)
                rows = torch.rand(B, C, 1, device=h.device) < copy_force
                force = F.pad(targets & rows, (n_other * C, 0))
        for norm, group in zip(self.retr_norms, self.groups):
            query = norm(h.view(B, C, S, -1)[:, :, -1])  # (B, C, d) hidden state at each landmark
            scores = retrieval_scores(query, lmk)
            if copy is not None:
                copy.append(copy_retrieval_loss(scores, targets, row_offset=n_other * C, valid_rows=has_landmark))
            r = causal_topk(
                scores,
                cfg.top_k,
                row_offset=n_other * C,  # the other sequences' chunks come first: every row may pick them
                valid_rows=has_landmark,
                gumbel=self.training and cfg.gumbel,
                force=force,
            )
            retrieval.append(r)
            idx, w = shift_to_queries(r)  # query chunk c uses the retrieval made at landmark c - 1
            for layer in group:
                h = self._layer(layer, h, cos, sin, mem_k, mem_v, idx, w)
        if copy is not None:
            copy = tuple(torch.stack(c).mean() for c in zip(*copy))
        return h[:, out_pos], retrieval, copy

    @staticmethod
    def _with_distractors(lmk, mem_k, mem_v, n: int):
        """The chunk memory of each sequence b with those of sequences b + 1 .. b + n (cyclically)
        placed before its own, (B, (n + 1) C, ...): retrieval indices then address the longer memory."""
        B = lmk.shape[0]
        if B <= n:
            raise ValueError(f"retrieval_distractors={n} needs a training batch of more than {n} sequences, got {B}")
        cat = lambda t: torch.cat([t.roll(-i, 0) for i in range(n, 0, -1)] + [t], dim=1)  # noqa: E731
        return cat(lmk), cat(mem_k), cat(mem_v)

    # ---- streaming ----
    @torch.inference_mode(False)  # normal tensors even under inference_mode (see _forward_cached)
    def new_cache(
        self, batch_size: int = 1, offload: bool = False, device=None, dtype=None, prefill_chunk: int = 4096,
        max_tokens: int | None = None, skip_upper: bool = True, keep_scores: bool = False,
    ) -> DRTCache:
        """A cache to stream ``batch_size`` sequences through the model.

        Args:
            offload: keep the chunk memory's keys/values in (pinned) CPU memory and fetch the
                retrieved chunks per step; GPU memory then stays bounded however long the context.
            device, dtype: of the cache's buffers when made (default: the model's; the device must be the
                model's when the cache is used, else a ValueError names both). They then take the
                dtype the model computes in (bf16 under autocast, else its parameters'): for a bf16 cache
                cast the model (``model.to(torch.bfloat16)``) or run it under autocast.
            prefill_chunk: the most positions processed at once when many tokens arrive together.
            max_tokens: how many tokens the cache will hold, if known: the chunk memory is allocated
                once at that size instead of growing by doubling (which briefly holds two copies; for
                16M tokens of the small preset that is 26 GB more, on the GPU or in pinned memory).
            skip_upper: with ``logits_to_keep``, run only the lower layers and the encoder over the
                positions no kept logit can reach through the upper layers (the logits are the same;
                ``False`` computes every layer everywhere, e.g. to time that). The sliding-window baseline
                (``arch="swa"``) skips every layer there: positions more than ``layers x window`` before the
                first kept token cannot reach it, so a 16M-token prompt costs what its last few thousand do.
            keep_scores: keep, per retrieval group, the noise-free scores of the last landmark read (chunk c) over
                every chunk it may pick (0 to c - 1) in ``cache.last_scores`` (float32 ``(B, c)``): where the
                chunks retrieval passed over ranked, e.g. how far a needle's chunk was from the top-k
                (``scripts/needle_rank.py``). Off by default (a copy of one row a piece).
        """
        cfg = self.config
        check_counts("new_cache", batch_size=batch_size, prefill_chunk=prefill_chunk)
        if max_tokens is not None and (not _is_int(max_tokens) or max_tokens < 0):  # 2.5 was taken as 2
            raise ValueError(f"new_cache: max_tokens must be an integer >= 0 or None, got {max_tokens!r}")
        p = self.embed.weight
        device = device or p.device
        dtype = dtype or p.dtype
        H, D = cfg.num_heads, cfg.head_dim
        if cfg.arch == "drt":
            W = cfg.window
            lower = [RingKV(batch_size, H, W, D, device, dtype) for _ in self.lower]
            upper = [RingKV(batch_size, H, W, D, device, dtype) for g in self.groups for _ in g]
            cap = 64 if max_tokens is None else max(1, -(-int(max_tokens) // cfg.text_per_chunk))
            mem = ChunkMemory(batch_size, cfg.hidden_size, cfg.chunk_size, cfg.kv_heads, D, device, offload, capacity=cap)
        else:
            W = cfg.window if cfg.arch == "swa" else None
            lower = [RingKV(batch_size, H, W, D, device, dtype) for _ in self.lower]
            upper, mem = [], None
        cache = DRTCache(batch_size=batch_size, lower=lower, upper=upper, memory=mem, made_for=self._cache_shape())
        cache.prefill_chunk = max(cfg.chunk_size, prefill_chunk)
        cache.skip_upper = skip_upper
        cache.keep_scores = keep_scores
        return cache

    def _cache_shape(self) -> dict:
        """What a cache must match to serve this model: made by a model of the same architecture."""
        cfg = self.config
        groups = [len(g) for g in getattr(self, "groups", [])]
        return dict(arch=cfg.arch, lower_layers=len(self.lower), upper_groups=groups, num_heads=cfg.num_heads,
                    head_dim=cfg.head_dim, kv_heads=cfg.kv_heads, hidden_size=cfg.hidden_size,
                    chunk_size=cfg.chunk_size, window=None if cfg.arch == "full" else cfg.window,
                    top_k=cfg.top_k if cfg.arch == "drt" else None)  # the cache keeps each group's last picks

    def check_cache(self, cache: DRTCache) -> None:
        """Raise ValueError when ``cache`` was made by a model of another shape (:meth:`new_cache`), lies on
        another device, or was filled in another compute dtype (the first use records it)."""
        ring = (cache.lower + cache.upper)[0] if cache.lower or cache.upper else None
        dev = self.embed.weight.device
        if ring is not None and ring.k.device != dev:  # else a cryptic error deep inside a layer
            raise ValueError(f"the cache is on {ring.k.device}, the model on {dev}: make the cache after moving the "
                             "model (new_cache() with no device), or move the model back")
        dev_type = self.embed.weight.device.type
        now = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else self.embed.weight.dtype
        if cache.compute_dtype is None:  # its first use fixes it
            cache.compute_dtype = now
        elif cache.compute_dtype != now:  # else a dtype error deep in a layer
            raise ValueError(f"the cache was filled in {cache.compute_dtype}, the model now computes in {now} (autocast "
                             f"switched, or the model cast, since): start a new cache (new_cache()), or go back")
        if cache.made_for is None:
            return
        mine = self._cache_shape()
        diff = [f"{k} {cache.made_for.get(k)!r} (this model: {v!r})" for k, v in mine.items() if cache.made_for.get(k) != v]
        if diff:
            raise ValueError("the cache was made by a model of another shape: " + ", ".join(diff)
                             + "; make one with this model's new_cache()")

    # Streaming is for inference: nothing is kept for a backward pass (no_grad). Inference mode is
    # switched off inside, so the cache only ever holds normal tensors: one filled under
    # torch.inference_mode() can be continued outside it (in place updates of inference tensors are
    # refused there) and the other way round, and the logits returned are normal tensors.
    @torch.inference_mode(False)
    @torch.no_grad()
    def _forward_cached(self, input_ids: torch.Tensor, cache: DRTCache, keep: int | None = None) -> torch.Tensor:
        self.check_cache(cache)
        if input_ids.shape[0] != cache.batch_size:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]}, the cache was made for {cache.batch_size}")
        if keep is not None and keep < 1:
            raise ValueError(f"logits_to_keep must be >= 1, got {keep}")
        cfg = self.config
        P, S = cfg.text_per_chunk, cfg.chunk_size
        L = input_ids.shape[1]
        step = max(P, cache.prefill_chunk * P // S)  # user tokens per piece
        first_kept = 0 if keep is None else max(0, L - keep)
        # Only the lower layers and the encoder make the chunk memory; the upper layers' output at a
        # position depends, through their sliding windows, on at most sum(upper_groups) x window
        # positions before it. So when only the last ``keep`` logits are wanted, pieces that end more
        # than that (plus two chunks: the retrieval carried into the first computed chunk) before the
        # first kept token skip the upper layers and retrieval: the kept logits are exactly those of
        # the full computation, and a long prefill costs the lower layers, not the whole model.
        # The sliding-window baseline has no memory: each layer's output at a position depends on at most
        # window - 1 positions before it in the layer below, so pieces that end more than layers x window
        # positions before the first kept token reach no kept logit at all and are not computed (their
        # positions still advance: the rotary angles of the computed ones are those of the full read).
        skip_before = 0
        if keep is not None and cache.skip_upper:
            if cfg.arch == "drt":
                skip_before = first_kept - (sum(cfg.upper_groups) * cfg.window + 2 * S)
            elif cfg.arch == "swa":
                skip_before = first_kept - len(self.lower) * cfg.window
        outs = []
        for i in range(0, L, step):
            n = min(step, L - i)
            want = max(0, i + n - max(first_kept, i))  # logits of this piece that are kept
            outs.append(self._step(input_ids[:, i : i + n], cache, want, upper=i + n > skip_before))
        return torch.cat(outs, dim=1)

    def _step(self, ids: torch.Tensor, cache: DRTCache, keep: int, upper: bool = True) -> torch.Tensor:
        """Process one piece; return the logits of its last ``keep`` tokens. ``upper=False`` (DRT, a
        piece whose upper-layer states no kept logit can reach) runs the lower layers and the encoder
        only: the chunk memory and the lower rings advance, the upper rings and retrieval do not. For the
        sliding-window baseline ``upper=False`` (a piece no kept logit can reach through any layer)
        computes nothing: only the positions advance."""
        cfg = self.config
        B, n = ids.shape
        dev = self.embed.weight.device
        if cfg.arch == "swa" and not upper:
            assert keep == 0, "a skipped piece has no logits to give"
            cache.positions += n
            cache.tokens += n
            cache.skipped_tokens += n
            return torch.zeros(B, 0, cfg.vocab_size, device=dev, dtype=cache.compute_dtype)
        ids = ids.to(dev)
        if cfg.arch != "drt":
            pos = torch.arange(cache.positions, cache.positions + n, device=dev)
            h = self.embed(ids)
            cos, sin = self._rope(n, dev, cache.positions)
            for layer, ring in zip(self.lower, cache.lower):
                h = layer.step(h, cos, sin, ring, pos)
            cache.positions += n
            cache.tokens += n
            return self._logits(self.norm(h[:, h.shape[1] - keep :]))

        P, S = cfg.text_per_chunk, cfg.chunk_size
        t = torch.arange(cache.tokens, cache.tokens + n, device=dev)
        tpos = (t // P) * S + t % P  # internal position of each user token
        completes = t % P == P - 1  # the token closes its chunk: its landmark follows at once
        p0 = cache.positions
        t_last = cache.tokens + n - 1  # host arithmetic: no device sync
        p1 = (t_last // P) * S + t_last % P + 1 + int(t_last % P == P - 1)
        T = p1 - p0
        x = torch.full((B, T), cfg.landmark_id, dtype=torch.long, device=dev)
        x[:, tpos - p0] = ids
        out_rel = tpos - p0 + completes.long()
        pos = torch.arange(p0, p1, device=dev)
        h = self.embed(x)
        cos, sin = self._rope(T, dev, p0)
        for layer, ring in zip(self.lower, cache.lower):
            h = layer.step(h, cos, sin, ring, pos)

        # encode the chunks this piece completed
        mem = cache.memory
        low = h if cache.pending_lower is None else torch.cat([cache.pending_lower, h], dim=1)
        c_a = p0 // S  # first chunk the piece touches
        n_done = p1 // S - c_a  # chunks completed by this piece
        if n_done:
            lmk, mk, mv = self.encoder(low[:, : n_done * S].reshape(B, n_done, S, -1))
            mem.append(lmk, mk, mv)
        cache.pending_lower = low[:, n_done * S :]
        if not upper:
            assert keep == 0, "a piece without its upper layers has no logits to give"
            cache.last_rows = []  # the next computed piece starts without a carried retrieval row
            cache.last_scores = []
            cache.positions = p1
            cache.tokens += n
            cache.skipped_tokens += n
            return h.new_zeros(B, 0, cfg.vocab_size)

        # retrieval and upper layers
        c_b = (p1 - 1) // S  # last chunk the piece touches
        offset = p0 - c_a * S
        lmk_rel = torch.arange(n_done, device=dev) * S + (c_a * S + S - 1 - p0)  # landmark positions in h
        rings = iter(cache.upper)
        if not cache.last_rows:
            empty = (torch.full((B, cfg.top_k), -1, dtype=torch.long, device=dev), torch.zeros(B, cfg.top_k, device=dev))
            cache.last_rows = [empty] * len(self.groups)
        for g, (norm, group) in enumerate(zip(self.retr_norms, self.groups)):
            prev_idx, prev_w = cache.last_rows[g]
            if n_done:
                query = norm(h[:, lmk_rel])  # (B, n_done, d)
                scores = retrieval_scores(query, mem.landmarks())
                if cache.keep_scores:  # the last landmark (chunk c_a + n_done - 1) may pick the chunks before it
                    cache.last_scores = (cache.last_scores or [None] * len(self.groups))
                    cache.last_scores[g] = scores[:, -1, : c_a + n_done - 1].float().clone()
                r = causal_topk(scores, cfg.top_k, row_offset=c_a)
                ridx, rw = _pad_slots(r.indices, r.weights, cfg.top_k)
                idx = torch.cat([prev_idx[:, None], ridx], 1)[:, : c_b - c_a + 1]
                w = torch.cat([prev_w[:, None].to(rw.dtype), rw], 1)[:, : c_b - c_a + 1]
                cache.last_rows[g] = (ridx[:, -1], rw[:, -1])
            else:
                idx, w = prev_idx[:, None], prev_w[:, None]
            fetched = mem.fetch(idx)
            gca_args = None if fetched is None else (fetched[0], fetched[1], fetched[2], w, offset)
            waited = [False]

            def wait():
                if not waited[0]:
                    mem.wait()
                    waited[0] = True

            for layer in group:
                h = layer.step(h, cos, sin, next(rings), pos, gca_args, wait=wait)
        cache.positions = p1
        cache.tokens += n
        return self._logits(self.norm(h[:, out_rel[out_rel.shape[0] - keep :]]))

    @torch.inference_mode(False)  # as _forward_cached: the cache (and the decoder's buffers) stay normal tensors
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | list[int] | None = None,
        cache: DRTCache | None = None,
        offload: bool = False,
        generator: torch.Generator | None = None,
        cuda_graph: bool | None = None,
        compile_step: bool = False,
    ) -> torch.Tensor:
        """Continue ``input_ids`` ``(B, L)`` by up to ``max_new_tokens`` tokens; returns ``(B, L + new)``.

        The prompt is prefilled through a streaming cache (pass ``cache`` to continue an existing
        one, ``offload=True`` to keep the chunk memory in CPU memory), then one token per step.
        Greedy by default; ``do_sample`` with ``temperature``, ``top_k`` and ``top_p`` samples.
        The prompts of a batch share one length: there is no padding or attention mask.
        ``eos_token_id`` (one id or a list, in ``[0, vocab_size)``): a sequence that produced one is done
        and continues with the first of them; generation stops when every sequence is done.
        A retrieval is made only when a chunk closes (every 63 tokens); see the README on where a
        question should end.

        ``cuda_graph`` (default: on CUDA): decode the tokens that do not close a chunk through a
        captured CUDA graph (:class:`gca.inference.GraphDecoder`); the tokens are the same, the host
        overhead of a step is gone. ``False`` decodes with plain streaming calls; ``True`` on a CPU
        model is an error. ``compile_step`` (with the graph only): compile its step with
        ``torch.compile`` first (H200, small preset, bf16: 1.23-1.67x the tokens/s; the first token waits
        7-12 s for the compile; logits equal up to bf16 rounding).
        """
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if cuda_graph and self.embed.weight.device.type != "cuda":  # before the prefill, not after it
            raise ValueError(f"cuda_graph=True needs a CUDA model, this one is on {self.embed.weight.device}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_k is not None:
            check_counts("generate", top_k=top_k)
        input_ids = self._check_ids(input_ids)
        eos = None
        if eos_token_id is not None:
            eos = torch.as_tensor(eos_token_id).reshape(-1)
            if not eos.numel():
                raise ValueError("eos_token_id is an empty list; pass None for no end-of-sequence id")
            # an id the model cannot produce never ends a sequence, and a float one was truncated to an int
            V = self.config.vocab_size
            if not integer_dtype(eos.dtype) or not ((eos >= 0) & (eos < V)).all():
                raise ValueError(f"eos_token_id must be integer token ids in [0, {V}), got {eos_token_id!r}")
            eos = eos.long()
        was_training = self.training
        self.eval()
        try:
            cache = cache or self.new_cache(input_ids.shape[0], offload=offload, max_tokens=input_ids.shape[1] + max_new_tokens)
            logits = self(input_ids, cache=cache, logits_to_keep=1).logits[:, -1]
            on_cuda = self.embed.weight.device.type == "cuda"
            dec = None
            if (on_cuda if cuda_graph is None else cuda_graph) and max_new_tokens > 1:
                from gca.inference.graph import GraphDecoder

                dec = GraphDecoder(self, cache, graph=True, compile=compile_step)
            out = [input_ids.to(logits.device)]
            done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=logits.device)
            eos = None if eos is None else eos.to(logits.device)
            for i in range(max_new_tokens):
                nxt = _pick(logits.float(), do_sample, temperature, top_k, top_p, generator)
                if eos is not None:
                    nxt = torch.where(done, eos[0], nxt)
                    done |= torch.isin(nxt, eos)
                out.append(nxt[:, None])
                if (eos is not None and done.all()) or i == max_new_tokens - 1:
                    break
                logits = dec.step(nxt) if dec is not None else self(nxt[:, None], cache=cache).logits[:, -1]
        finally:  # an error (a cache of another batch size, ...) leaves a training model in training mode
            self.train(was_training)
        return torch.cat(out, dim=1)


def _pad_slots(idx: torch.Tensor, w: torch.Tensor, k: int):
    """Pad retrieval rows to k slots with empty entries (-1, weight 0)."""
    missing = k - idx.shape[-1]
    if missing <= 0:
        return idx, w
    return F.pad(idx, (0, missing), value=-1), F.pad(w, (0, missing), value=0.0)


def _pick(logits, do_sample, temperature, top_k, top_p, generator):
    """Next token from logits ``(B, V)``: argmax, or a sample after temperature / top-k / top-p."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
