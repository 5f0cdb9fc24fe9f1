"""The DRT model (and its sliding-window-only and full-attention baselines).

    cfg = DRTConfig.from_preset("tiny")
    model = DRT(cfg)
    out = model(input_ids, labels=input_ids, output_retrieval=True)
    out.logits   # (B, L, vocab), row t predicts token t + 1
    out.loss     # mean cross-entropy of logits[:, :-1] against labels[:, 1:]
    out.retrieval[g].indices  # (B, C, K): chunks retrieved at chunk c's landmark, all < c or -1

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

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from gca.config import DRTConfig
from gca.nn.layers import ChunkEncoder, DecoderLayer, RMSNorm, UpperLayer, rope_cos_sin
from gca.retrieval import Retrieval, causal_topk, retrieval_scores, shift_to_queries


@dataclass
class DRTOutput:
    logits: torch.Tensor  # (B, L, vocab)
    loss: torch.Tensor | None = None
    retrieval: list[Retrieval] | None = None  # one entry per retrieval group


class DRT(nn.Module):
    """A DRT language model; ``cfg.arch`` selects DRT or one of the two baselines."""

    def __init__(self, config: DRTConfig):
        super().__init__()
        if not isinstance(config, DRTConfig):
            raise TypeError(f"DRT expects a DRTConfig, got {type(config).__name__}")
        self.config = cfg = config.validate()
        self.gradient_checkpointing = False
        n_emb = cfg.vocab_size + (1 if cfg.arch == "drt" else 0)  # + the landmark id
        self.embed = nn.Embedding(n_emb, cfg.hidden_size)
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
        self.apply(self._init)
        # GPT-2 style: shrink the residual branches' output projections with depth
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight", "gca.o.weight")):
                nn.init.normal_(p, std=cfg.init_std / (2 * cfg.num_layers) ** 0.5)

    def _init(self, m: nn.Module):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- input handling ----
    def _check_ids(self, input_ids: torch.Tensor, name: str = "input_ids", allow_ignore: bool = False):
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64):
            raise ValueError(f"{name} must be an integer tensor (torch.long), got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(f"{name} must have shape (batch, length), got {tuple(input_ids.shape)}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"{name} is empty (shape {tuple(input_ids.shape)}); pass at least one token")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        V = self.config.vocab_size
        if hi >= V or (lo < 0 and not (allow_ignore and lo == -100 and (input_ids[input_ids < 0] == -100).all())):
            allowed = f"[0, {V})" + (" or -100 (ignored)" if allow_ignore else "")
            raise ValueError(f"{name} must lie in {allowed}; got values in [{lo}, {hi}]")

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
    ) -> DRTOutput:
        """Args:
            input_ids: ``(B, L)`` token ids in ``[0, vocab_size)``, any L >= 1.
            labels: optional ``(B, L)`` ids (usually ``input_ids``); -100 is ignored. The loss is the
                mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]``.
            output_retrieval: also return each group's retrieval (DRT only).
        """
        self._check_ids(input_ids)
        if labels is not None:
            self._check_ids(labels, "labels", allow_ignore=True)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must match input_ids {tuple(input_ids.shape)}")
            if input_ids.shape[1] < 2:
                raise ValueError("a loss needs at least 2 tokens per sequence (labels are shifted by one)")
        if self.config.arch == "drt":
            h, retrieval = self._forward_drt(input_ids)
        else:
            h, retrieval = self._forward_baseline(input_ids), None
        logits = self._logits(self.norm(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return DRTOutput(logits=logits, loss=loss, retrieval=retrieval if output_retrieval else None)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.lm_head is not None:
            return self.lm_head(h)
        return F.linear(h, self.embed.weight[: self.config.vocab_size])

    def _rope(self, T: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        return rope_cos_sin(torch.arange(T, device=device), self.config.head_dim, self.config.rope_theta)

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

    def _forward_drt(self, input_ids: torch.Tensor):
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
        retrieval = []
        for norm, group in zip(self.retr_norms, self.groups):
            query = norm(h.view(B, C, S, -1)[:, :, -1])  # (B, C, d) hidden state at each landmark
            r = causal_topk(
                retrieval_scores(query, lmk),
                cfg.top_k,
                valid_rows=has_landmark,
                gumbel=self.training and cfg.gumbel,
            )
            retrieval.append(r)
            idx, w = shift_to_queries(r)  # query chunk c uses the retrieval made at landmark c - 1
            for layer in group:
                h = self._layer(layer, h, cos, sin, mem_k, mem_v, idx, w)
        return h[:, out_pos], retrieval
