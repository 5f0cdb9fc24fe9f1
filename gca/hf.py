"""Hugging Face ``transformers`` integration: a DRT as a ``PreTrainedModel`` with ``generate()``.

    import gca, gca.hf
    hf = gca.hf.from_drt(gca.DRT(gca.DRTConfig.from_preset("tiny")))
    hf.save_pretrained("drt-tiny")                          # config.json + model.safetensors
    hf = AutoModelForCausalLM.from_pretrained("drt-tiny")  # after ``import gca.hf``
    out = hf.generate(input_ids, max_new_tokens=20)        # greedy; do_sample=True samples
    drt = hf.to_drt()                                      # back to the plain gca.DRT

Install with ``pip install -e '.[hf]'`` in the gca checkout; the core ``gca`` package never imports ``transformers``.
The config (:class:`DRTHFConfig`) holds every ``DRTConfig`` field under its own name, except
``top_k`` (chunks retrieved), stored as ``retrieval_top_k``: ``top_k`` is a generation parameter
in ``transformers``.

How generation caches. A DRT streams through its own :class:`~gca.inference.cache.DRTCache`
(sliding-window rings, the chunk memory and the last retrieval), which is not a per-layer
key/value cache. It travels through ``generate()`` as ``past_key_values`` inside
:class:`DRTHFCache`, a small ``transformers.Cache`` subclass. The model declines the default
``DynamicCache`` (``_supports_default_dynamic_cache`` is False), so ``generate()`` starts with
no cache; the first forward (``use_cache=True``) creates a ``DRTHFCache``, prefills the prompt and
returns it, and :meth:`DRTForCausalLM.prepare_inputs_for_generation` then feeds only the tokens
the cache has not seen. The prefill keeps only the last logit (``logits_to_keep=1``, as ``generate()``
asks) and every later step costs one streaming step, as in ``gca.DRT.generate``, whose greedy output
it equals. On CUDA the one-token steps of a ``drt`` or ``swa`` model replay a
CUDA graph (:class:`gca.inference.GraphDecoder`, kept on the cache), as ``gca.DRT.generate`` does;
set ``hf.cuda_graph = False`` for plain streaming calls (``True`` uses the decoder on any device: on
a CPU it runs the same static step without a graph). With ``use_cache=False`` each step recomputes the
full forward pass instead (correct, slow). A cache for long contexts with the chunk memory in CPU memory:
``hf.generate(ids, cache=hf.new_cache(batch_size, offload=True), ...)`` (``past_key_values=`` works too:
:meth:`DRTForCausalLM.generate` hands either on under the name the installed ``transformers`` uses).

Limits. Greedy and (top-k / top-p / temperature) sampling are supported; beam search and
assisted decoding are not (the streaming cache cannot be reordered or rolled back). Only
all-ones attention masks are accepted: the streaming cache has no notion of padding, so batch
sequences of equal length (or generate them one at a time).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings
from pathlib import Path
from typing import Any

try:
    import transformers
    import transformers.generation.utils as _generation_utils
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PreTrainedModel
    from transformers.cache_utils import Cache
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "gca.hf needs Hugging Face transformers (>= 4.50), which is not installed: "
        "pip install -e '.[hf]' in the gca checkout  (or: pip install 'transformers>=4.50')"
    ) from e

import torch

from gca.config import DRTConfig
from gca.inference.cache import DRTCache
from gca.model import DRT, RESIDUAL_PROJECTIONS
from gca.nn.layers import ChunkEncoder, RMSNorm

# transformers 5 renamed the config base class (PretrainedConfig stays as an alias)
_ConfigBase = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
# generate()'s name for a cache passed in: `cache` where transformers knows that name (5.24 on, which
# deprecates `past_key_values` there, to go in 6.0), `past_key_values` before
_GENERATE_CACHE_NAME = (
    "cache" if "cache" in getattr(_generation_utils, "ALL_CACHE_NAMES", ()) else "past_key_values"
)

# the output classes' field for the cache: `cache` from 5.24 (`past_key_values` there is a deprecated alias
# whose use logs a warning), `past_key_values` before
_OUTPUT_CACHE_NAME = (
    "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"
)

__all__ = ["DRTHFConfig", "DRTForCausalLM", "DRTHFCache", "from_drt", "register"]

_FIELDS = tuple(f.name for f in dataclasses.fields(DRTConfig))
# DRTConfig field -> DRTHFConfig attribute, where the name means something else to transformers:
# ``top_k`` is a generation parameter there (it would leak into generate() and block saving).
_RENAMED = {"top_k": "retrieval_top_k"}


def _attr(name: str) -> str:
    return _RENAMED.get(name, name)


class DRTHFConfig(_ConfigBase):
    """A ``transformers`` config holding every :class:`~gca.config.DRTConfig` field as an attribute.

    The fields keep their names except ``top_k`` (chunks retrieved per chunk), stored as
    ``retrieval_top_k`` because ``top_k`` is a ``transformers`` generation parameter. Build one with
    :meth:`from_drt_config` (or keyword arguments); :meth:`to_drt_config` gives the validated
    ``DRTConfig`` back. Unset fields take the ``DRTConfig`` defaults. ``tie_word_embeddings`` is
    False on the ``transformers`` side: a DRT with ``tie_embeddings=True`` has a single embedding
    parameter that it also uses as its output layer, so there is nothing for ``transformers`` to tie.
    """

    model_type = "drt"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"num_attention_heads": "num_heads"}

    def __init__(self, **kwargs: Any):
        if "top_k" in kwargs:
            if "arch" in kwargs and "retrieval_top_k" not in kwargs:  # a gca checkpoint's config.json
                raise ValueError(
                    "this is a gca checkpoint's config.json (gca train, gca.train.save_model: `arch` and `top_k`), not a "
                    "transformers one: load the model with gca.train.load_model(DIR) and wrap it with "
                    "gca.hf.from_drt(model) (its save_pretrained then writes a transformers folder)"
                )
            raise ValueError(
                "DRTHFConfig stores DRTConfig.top_k as `retrieval_top_k` (`top_k` is a transformers "
                "generation parameter); pass retrieval_top_k=..., or use DRTHFConfig.from_drt_config(cfg)"
            )
        defaults = DRTConfig().to_dict()
        values = {name: kwargs.pop(_attr(name), defaults[name]) for name in _FIELDS}
        if isinstance(values["upper_groups"], tuple):
            values["upper_groups"] = list(values["upper_groups"])
        DRTConfig(**values)  # validate now, with DRTConfig's error messages
        for name, value in values.items():
            setattr(self, _attr(name), value)
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)

    @property
    def num_hidden_layers(self) -> int:
        """Decoder layers (``num_lower_layers + sum(upper_groups)``), the name ``transformers`` uses."""
        return self.num_lower_layers + sum(self.upper_groups)

    @classmethod
    def from_drt_config(cls, config: DRTConfig, **kwargs: Any) -> "DRTHFConfig":
        """The ``transformers`` config of a :class:`DRTConfig` (extra ``kwargs`` go to the HF base)."""
        if not isinstance(config, DRTConfig):
            raise TypeError(f"expected a DRTConfig, got {type(config).__name__}")
        return cls(**{_attr(k): v for k, v in config.to_dict().items()}, **kwargs)

    def to_drt_config(self) -> DRTConfig:
        """The validated :class:`DRTConfig` these fields describe."""
        return DRTConfig.from_dict({name: getattr(self, _attr(name)) for name in _FIELDS})


def _cache_base_kwargs() -> dict[str, Any]:
    # transformers 5's Cache wants its per-layer list (we have none); 4.x's takes no arguments
    params = inspect.signature(Cache.__init__).parameters
    return {"layers": []} if "layers" in params else {}


class DRTHFCache(Cache):
    """A :class:`~gca.inference.cache.DRTCache` carried through ``transformers`` as ``past_key_values``.

    It holds no per-layer key/value tensors of its own; ``get_seq_length()`` is the number of
    user tokens the wrapped cache has consumed, which is what ``generate()`` asks of a cache.
    It cannot be cropped or reordered, so beam search and assisted decoding are unsupported.
    """

    def __init__(self, drt_cache: DRTCache):
        super().__init__(**_cache_base_kwargs())
        if not isinstance(drt_cache, DRTCache):
            raise TypeError(f"DRTHFCache wraps a gca DRTCache, got {type(drt_cache).__name__}")
        self.drt_cache = drt_cache
        self.decoder = None  # a GraphDecoder over drt_cache, made at the first one-token step that uses it

    def __repr__(self) -> str:
        c = self.drt_cache
        return f"DRTHFCache(batch_size={c.batch_size}, tokens={c.tokens}, positions={c.positions})"

    def __bool__(self) -> bool:  # Cache may define __len__ (layers), which would make us falsy
        return True

    def get_seq_length(self, layer_idx: int | None = 0) -> int:
        """User tokens consumed so far (landmarks excluded)."""
        return self.drt_cache.tokens

    def get_max_length(self, *args, **kwargs) -> None:  # no maximum: the context is unbounded
        return None

    def get_max_cache_shape(self, *args, **kwargs) -> int:
        return -1

    @property
    def batch_size(self) -> int:
        return self.drt_cache.batch_size

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"DRTHFCache does not support {what}: the DRT streaming cache cannot be edited per layer, "
            "cropped or reordered (use greedy or sampling generation, num_beams=1, no assistant model)"
        )

    def update(self, *args, **kwargs):
        self._unsupported("per-layer key/value updates")

    def crop(self, *args, **kwargs):
        self._unsupported("cropping")

    def reorder_cache(self, *args, **kwargs):
        self._unsupported("reordering (beam search)")

    def batch_repeat_interleave(self, *args, **kwargs):
        self._unsupported("batch expansion")

    def batch_select_indices(self, *args, **kwargs):
        self._unsupported("batch selection")

    def reset(self):
        self._unsupported("reset (make a new cache with DRTForCausalLM.new_cache)")


def _check_attention_mask(attention_mask: torch.Tensor | None) -> None:
    """Only all-ones 2-D masks are supported (no padding)."""
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        raise ValueError(
            "DRTForCausalLM accepts only a 2-D (batch, length) attention_mask of ones, got "
            f"{type(attention_mask).__name__}"
            + (f" of shape {tuple(attention_mask.shape)}" if isinstance(attention_mask, torch.Tensor) else "")
        )
    if not bool((attention_mask == 1).all()):
        raise ValueError(
            "DRTForCausalLM does not support padding: attention_mask must be all ones. The DRT "
            "streaming cache has no notion of padded (e.g. left-padded) positions; batch sequences "
            "of equal length together, or run them one at a time. (generate() makes such a mask itself "
            "when no attention_mask is given and input_ids contain pad_token_id: if those ids are not "
            "padding, pass attention_mask=torch.ones_like(input_ids).)"
        )


try:  # transformers 5 validates the generation mode against this list
    from transformers.generation.configuration_utils import GenerationMode as _GenerationMode

    _MODES = (_GenerationMode.GREEDY_SEARCH, _GenerationMode.SAMPLE)
except ImportError:  # pragma: no cover
    _MODES = None


class DRTForCausalLM(PreTrainedModel, GenerationMixin):
    """A :class:`gca.DRT` (as ``self.model``) behind the ``transformers`` causal-LM interface.

    ``forward(input_ids, labels=None, past_key_values=None, use_cache=None, attention_mask=None)``
    returns a ``CausalLMOutputWithPast``. Without a cache it is one full forward pass of the DRT
    (with the DRT's loss when ``labels`` are given, shifted inside as in ``transformers``). With
    ``past_key_values`` (a :class:`DRTHFCache`), or ``use_cache=True``, the tokens continue the
    cached sequence through the DRT's streaming path, only their logits are returned (equal to the
    full pass up to rounding; no gradients) and the cache is returned as ``past_key_values``.
    """

    config_class = DRTHFConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # a tied DRT has one embedding parameter that is also its output layer: nothing to tie or untie
    _tied_weights_keys = None
    _is_stateful = True  # the streaming cache cannot be rolled back: no assisted decoding
    _supports_cache_class = True  # transformers 4.x: past_key_values is a Cache object
    if _MODES is not None:
        _supported_generation_modes = _MODES

    cuda_graph: bool | None = None  # one-token cached steps through a GraphDecoder: None = on CUDA

    def __init__(self, config: DRTHFConfig):
        super().__init__(config)
        self.model = DRT(config.to_drt_config())
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """``transformers``' ``from_pretrained``; a ``gca train`` run folder (its weights in ``ckpt/``, no
        ``config.json`` at the top) is named as one, with how to load it, instead of "no model.safetensors"."""
        if "top_k" in kwargs:  # else transformers hands it to __init__: "unexpected keyword argument 'top_k'"
            raise ValueError(
                "from_pretrained(..., top_k=...): DRTHFConfig stores DRTConfig.top_k as `retrieval_top_k` (`top_k` "
                "is a transformers generation parameter); pass retrieval_top_k=..."
            )
        path = Path(str(pretrained_model_name_or_path)).expanduser()
        if path.is_dir() and not (path / "config.json").exists() and (path / "ckpt" / "config.json").exists():
            raise ValueError(
                f"{path} is a gca training run, not a transformers checkpoint: load its model with "
                f"gca.train.load_model({str(path)!r}) and wrap it with gca.hf.from_drt(model) (then save_pretrained "
                f"makes a transformers folder)"
            )
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """``transformers``' ``save_pretrained``, with the config taken from the wrapped model first: the
        DRT reads its own ``gca.DRTConfig`` (``hf.model.config``), so a field changed there (e.g. ``top_k``
        for evaluation) is what the model does and what is saved; a field changed only on ``hf.config``
        is not seen by the model and is overwritten, with a warning naming it."""
        fresh = DRTHFConfig.from_drt_config(self.model.config)
        stale = [
            f"{_attr(name)}={getattr(self.config, _attr(name), None)!r} (the model has {getattr(fresh, _attr(name))!r})"
            for name in _FIELDS
            if getattr(self.config, _attr(name), None) != getattr(fresh, _attr(name))
        ]
        if stale:
            warnings.warn(
                "DRTForCausalLM.save_pretrained: the transformers config differs from the wrapped DRT's config in "
                + ", ".join(stale) + "; the DRT reads only its own (hf.model.config), so its values are saved",
                stacklevel=2,
            )
        for name in _FIELDS:
            value = getattr(fresh, _attr(name))
            setattr(self.config, _attr(name), list(value) if isinstance(value, tuple) else value)
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- weights ----
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Initialise ``module``'s own parameters as ``gca.DRT`` does when it is built: linear and
        embedding weights ``normal(0, init_std)``, the residual branches' output projections with the
        std divided by ``sqrt(2 x layers)``, norm weights 1, the memory-key shift 0.5.

        ``from_pretrained`` builds the model without initialising it and calls this for the weights the
        checkpoint lacks (inside ``transformers`` the loaded ones are skipped); a no-op here left those
        weights as uninitialised memory (NaN or 1e38 in the logits)."""
        cfg = self.config
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            std = cfg.init_std
            names = self.__dict__.get("_init_names")
            if names is None or id(module) not in names:  # (one walk of the modules, not one per module)
                names = self.__dict__["_init_names"] = {id(m): n for n, m in self.named_modules()}
            name = names.get(id(module), "")
            if name.endswith(RESIDUAL_PROJECTIONS):
                std = std / (2 * self.model.config.num_layers) ** 0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)
        elif isinstance(module, ChunkEncoder) and getattr(module, "key_shift", None) is not None:
            torch.nn.init.constant_(module.key_shift, 0.5)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The DRT's token embedding; its last row (id ``vocab_size``) is the landmark."""
        return self.model.embed

    def set_input_embeddings(self, value: torch.nn.Embedding) -> None:
        self.model.embed = value

    def get_output_embeddings(self):
        """The untied LM head, or None when the DRT reuses its embedding as the output layer."""
        return self.model.lm_head

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> torch.nn.Embedding:
        """Make the vocabulary ``new_num_tokens`` ids (rounded up to a multiple of ``pad_to_multiple_of``).

        ``vocab_size`` changes in both configs (so ``save_pretrained`` / ``from_pretrained`` round-trip
        and ids up to the new size are taken), the embedding and an untied LM head keep the rows of the
        ids both sizes share, and the landmark's row moves to the new ``vocab_size`` (the embedding stays
        padded to a multiple of 64 rows). New rows take the mean of the old ones (``mean_resizing``, what
        ``transformers`` samples around) or ``normal(0, init_std)``. Returns the new embedding.
        """
        m = self.model
        if new_num_tokens is None and pad_to_multiple_of is None:
            return m.embed
        old = m.config.vocab_size
        new = old if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            new = -(-new // pad_to_multiple_of) * pad_to_multiple_of
        cfg = m.config.replace(vocab_size=new)  # validates (a positive integer)
        keep = min(old, new)

        def resized(w_old: torch.Tensor, rows: int) -> torch.Tensor:
            w = w_old.new_zeros(rows, w_old.shape[1])
            w[:keep] = w_old[:keep]
            if new > keep:
                if mean_resizing:
                    w[keep:new] = w_old[:old].float().mean(0).to(w.dtype)
                else:
                    w[keep:new].normal_(0.0, cfg.init_std)
            return w

        with torch.no_grad():
            lmk = 1 if cfg.arch == "drt" else 0
            w = resized(m.embed.weight, -(-(new + lmk) // 64) * 64)
            if lmk:
                w[new] = m.embed.weight[old]  # the landmark's row
            embed = torch.nn.Embedding(w.shape[0], w.shape[1], device=w.device, dtype=w.dtype)
            embed.weight.copy_(w)
            embed.weight.requires_grad_(m.embed.weight.requires_grad)
            m.embed = embed
            if m.lm_head is not None:
                head = torch.nn.Linear(cfg.hidden_size, new, bias=False, device=w.device, dtype=m.lm_head.weight.dtype)
                head.weight.copy_(resized(m.lm_head.weight, new))
                head.weight.requires_grad_(m.lm_head.weight.requires_grad)
                m.lm_head = head
        m.config = cfg
        self.config.vocab_size = new
        self.vocab_size = new
        return m.embed

    # ---- conversion ----
    @classmethod
    def from_drt(cls, model: DRT) -> "DRTForCausalLM":
        """Wrap an existing :class:`gca.DRT` (its parameters are shared, not copied)."""
        if not isinstance(model, DRT):
            raise TypeError(f"expected a gca.DRT, got {type(model).__name__}")
        config = DRTHFConfig.from_drt_config(model.config)
        with torch.device("meta"):  # skip building and initialising a throwaway DRT
            hf = cls(config)
        hf.model = model
        hf.train(model.training)
        return hf

    def to_drt(self) -> DRT:
        """The wrapped :class:`gca.DRT` (shared, not copied)."""
        return self.model

    def new_cache(self, batch_size: int = 1, offload: bool = False, **kwargs: Any) -> DRTHFCache:
        """An empty streaming cache to pass to :meth:`generate` (``offload=True`` keeps the chunk
        memory in CPU memory); ``kwargs`` go to :meth:`gca.DRT.new_cache`."""
        return DRTHFCache(self.model.new_cache(batch_size, offload=offload, **kwargs))

    def generate(self, *args: Any, cache: DRTHFCache | None = None, **kwargs: Any):
        """``transformers``' ``generate()``, taking a streaming cache made by :meth:`new_cache` as
        ``cache=`` or ``past_key_values=`` on any ``transformers`` release: it is passed on under the
        name the installed one expects (``cache`` from 5.24, which deprecates ``past_key_values``).

        Runs in eval mode and puts a training model back afterwards, as ``gca.DRT.generate`` does: in
        training mode retrieval adds Gumbel noise (and distractor chunks, where configured) to every
        forward, so a model left in ``train()`` generated noise-dependent text, different with and without
        the cache."""
        ids = args[0] if args else kwargs.get("inputs", kwargs.get("input_ids"))
        if isinstance(ids, torch.Tensor) and ids.dim() != 2:  # transformers failed with an IndexError
            raise ValueError(f"input_ids must have shape (batch, length), got {tuple(ids.shape)}")
        old = kwargs.pop("past_key_values", None)
        if cache is not None and old is not None:
            raise ValueError("generate() got a cache twice: pass it as cache= or as past_key_values=, not both")
        given = cache if cache is not None else old
        if given is not None:
            kwargs[_GENERATE_CACHE_NAME] = given
        was_training = self.training
        self.eval()
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.train(was_training)

    # ---- forward ----
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        past_key_values: DRTHFCache | None = None,
        use_cache: bool | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        return_dict: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        cache: DRTHFCache | None = None,
        logits_to_keep: int = 0,
        **kwargs: Any,
    ):
        """Logits (and loss) for ``input_ids`` ``(B, L)``; see the class docstring for the cache.

        ``logits_to_keep``: return only the logits of the last ``logits_to_keep`` tokens (0: all), as
        ``generate()`` asks for its prefill; with a cache, a long prefill then also runs the upper layers
        only near its end (:meth:`gca.DRT.forward`). ``position_ids``, ``cache_position`` and other
        generation bookkeeping are accepted and ignored (positions follow from the cache).
        ``inputs_embeds``, attentions and hidden states are not supported.
        """
        if inputs_embeds is not None:
            raise ValueError("DRTForCausalLM does not support inputs_embeds; pass input_ids")
        if input_ids is None:
            raise ValueError("input_ids is required")
        if output_attentions or output_hidden_states:
            raise ValueError("DRTForCausalLM cannot output attentions or hidden states")
        _check_attention_mask(attention_mask)
        return_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)

        given = past_key_values if past_key_values is not None else cache  # transformers >= 5.24 says `cache`
        stream = self._as_cache(given, use_cache and labels is None, input_ids.shape[0])
        if attention_mask is not None and isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
            # a mask of another batch or length was taken silently; generate()'s covers the cached tokens too
            B, L = input_ids.shape
            lengths = {L} if stream is None else {L, stream.get_seq_length() + L}
            if attention_mask.shape[0] != B or attention_mask.shape[1] not in lengths:
                raise ValueError(
                    f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {(B, L)}: expected ({B}, "
                    + " or ".join(str(n) for n in sorted(lengths)) + ")"
                    + (" (the new tokens, or the cached ones and the new)" if len(lengths) > 1 else "")
                )
        keep = logits_to_keep or None  # transformers' 0 = every logit
        if stream is not None:
            if labels is not None:
                raise ValueError("labels are not supported with past_key_values (the streaming path has no loss)")
            logits = self._stream(input_ids, stream, keep)
            out = CausalLMOutputWithPast(loss=None, logits=logits, **{_OUTPUT_CACHE_NAME: stream})
        else:
            o = self.model(input_ids, labels=labels, logits_to_keep=keep)
            out = CausalLMOutputWithPast(loss=o.loss, logits=o.logits)
        return out if return_dict else out.to_tuple()

    def _stream(self, input_ids: torch.Tensor, stream: DRTHFCache, keep: int | None = None) -> torch.Tensor:
        """Logits of ``input_ids`` continuing the cached sequence (the last ``keep`` of them); one-token
        steps through the cache's GraphDecoder when :attr:`cuda_graph` asks for it."""
        m = self.model
        use = self.cuda_graph
        if use is None:
            use = m.embed.weight.device.type == "cuda"
        if not (use and input_ids.shape[1] == 1 and not m.training):
            return m(input_ids, cache=stream.drt_cache, logits_to_keep=keep).logits
        # the GraphDecoder leaves CUDA ids unchecked (its own loop avoids the sync); generate() syncs every step
        # anyway, so check them here as every other path does: an id past the vocabulary read a padding row
        m._check_ids(input_ids)
        if stream.decoder is None or stream.decoder.model is not m:
            from gca.inference.graph import GraphDecoder

            stream.decoder = GraphDecoder(m, stream.drt_cache)
        return stream.decoder.step(input_ids[:, 0])[:, None]

    def _as_cache(self, past_key_values, use_cache: bool | None, batch_size: int) -> DRTHFCache | None:
        """The streaming cache to use: the one given, a fresh one when caching is asked for (or an
        empty foreign ``Cache`` was passed, e.g. a ``DynamicCache`` made by ``generate``), or None."""
        if isinstance(past_key_values, DRTHFCache):
            return past_key_values
        if isinstance(past_key_values, DRTCache):
            return DRTHFCache(past_key_values)
        if past_key_values is not None:
            if isinstance(past_key_values, Cache) and past_key_values.get_seq_length() == 0:
                return self.new_cache(batch_size)
            raise ValueError(
                "DRTForCausalLM needs its own streaming cache as past_key_values (a DRTHFCache from "
                f"model.new_cache(batch_size)), got {type(past_key_values).__name__}"
            )
        return self.new_cache(batch_size) if use_cache else None

    # ---- generation ----
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """``generate()`` must not make a ``DynamicCache``: the first forward makes a ``DRTHFCache``."""
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: DRTHFCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache: DRTHFCache | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Feed only the tokens the cache has not consumed (all of them without a cache). The cache
        comes as ``past_key_values`` (transformers < 5.24) or ``cache`` (later versions)."""
        if inputs_embeds is not None:
            raise ValueError("DRTForCausalLM does not support inputs_embeds; pass input_ids")
        if past_key_values is None:
            past_key_values = cache
        if past_key_values is not None and isinstance(past_key_values, (Cache, DRTCache)):
            seen = past_key_values.tokens if isinstance(past_key_values, DRTCache) else past_key_values.get_seq_length()
            if seen:
                if seen >= input_ids.shape[1]:
                    raise ValueError(
                        f"the cache has already consumed {seen} tokens and input_ids has {input_ids.shape[1]}: "
                        "pass the full sequence, the cached prefix followed by at least one token the cache has "
                        "not seen (it keeps no logits, so the next token needs a new input)"
                    )
                input_ids = input_ids[:, seen:]
        inputs = {"input_ids": input_ids.contiguous(), _GENERATE_CACHE_NAME: past_key_values, "use_cache": use_cache}
        if attention_mask is not None:
            inputs["attention_mask"] = attention_mask
        if kwargs.get("logits_to_keep") is not None:  # generate() wants the last logit only
            inputs["logits_to_keep"] = kwargs["logits_to_keep"]
        return inputs


def from_drt(model: DRT) -> DRTForCausalLM:
    """Wrap a :class:`gca.DRT` as a :class:`DRTForCausalLM` (parameters shared, not copied)."""
    return DRTForCausalLM.from_drt(model)


def register() -> None:
    """Register ``"drt"`` with ``AutoConfig`` and ``AutoModelForCausalLM`` (done on import; idempotent)."""
    for auto, args in ((AutoConfig, ("drt", DRTHFConfig)), (AutoModelForCausalLM, (DRTHFConfig, DRTForCausalLM))):
        try:
            auto.register(*args, exist_ok=True)
        except TypeError:  # pragma: no cover - a transformers without exist_ok
            try:
                auto.register(*args)
            except ValueError:
                pass


register()
