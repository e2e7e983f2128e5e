"""Item tower: a BERT-family encoder over item text, pooled and projected, plus an optional id embedding."""

from __future__ import annotations

import logging
from typing import cast

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

log = logging.getLogger(__name__)

CPU_CHUNK_SIZE = 256


def activation_bytes_per_item(hidden: int, layers: int, heads: int, tokens: int, bytes_per_value: int = 2) -> int:
    """Activations one text of ``tokens`` tokens keeps through ``layers`` BERT layers for the
    backward pass: ``tokens * (34 * hidden + 5 * heads * tokens)`` bytes per layer in 16-bit
    (Korthikanti et al. 2022, dropout masks and attention scores included), scaled to the width
    of the activations' dtype."""
    return tokens * (34 * hidden + 5 * heads * tokens) * layers * bytes_per_value // 2


def auto_chunk_size(
    device_type: str,
    free_bytes: int | None,
    hidden: int,
    layers: int,
    heads: int,
    tokens: int,
    bytes_per_value: int = 2,
    memory_fraction: float = 0.25,
    cpu_chunk: int = CPU_CHUNK_SIZE,
    smallest: int = 64,
    largest: int = 8192,
) -> int:
    """Items encoded per chunk: ``cpu_chunk`` on a CPU (caches, not memory, bound it there); on an
    accelerator, as many items as fit in ``memory_fraction`` of its free memory by their
    activations (``activation_bytes_per_item``), rounded down to a power of two within
    [``smallest``, ``largest``]. Larger chunks make larger kernels: 256 items leave an H200 idle."""
    if device_type == "cpu" or free_bytes is None:
        return cpu_chunk
    per_item = max(1, activation_bytes_per_item(hidden, layers, heads, tokens, bytes_per_value))
    fits = int(free_bytes * memory_fraction) // per_item
    if fits < smallest:
        return smallest
    return min(largest, 1 << (fits.bit_length() - 1))


def tokenize_catalog(tokenizer, texts: list[str], max_tokens: int, chunk: int = 16_384) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention masks of every item text, padded to the longest text (at most
    ``max_tokens``). Tokenised ``chunk`` texts at a time: the tokenizer's Python-side encodings of
    a million texts at once take gigabytes (and the allocator keeps them)."""
    ids, masks = [], []
    for start in range(0, max(1, len(texts)), chunk):
        enc = tokenizer(texts[start : start + chunk], padding="max_length", truncation=True, max_length=max_tokens, return_tensors="pt")
        ids.append(enc["input_ids"])
        masks.append(enc["attention_mask"])
    token_ids, attention_mask = torch.cat(ids), torch.cat(masks)
    width = max(1, int(attention_mask.sum(dim=1).max())) if len(texts) else 1
    return token_ids[:, :width].contiguous(), attention_mask[:, :width].contiguous()


def bert_layers(encoder: PreTrainedModel) -> nn.ModuleList:
    """The transformer blocks of a BERT-family encoder (``encoder.encoder.layer``)."""
    # torch types a submodule reached by attribute (Module.__getattr__) as Tensor | Module;
    # in the BERT family ``encoder`` is the block stack and ``layer`` its ModuleList
    return cast(nn.ModuleList, cast(nn.Module, encoder.encoder).layer)


def bert_embeddings(encoder: PreTrainedModel) -> nn.Module:
    """The embedding layer of a BERT-family encoder (``encoder.embeddings``)."""
    # Module.__getattr__ types it Tensor | Module; in the BERT family it is a module
    return cast(nn.Module, encoder.embeddings)


class ItemTower(nn.Module):
    """Maps item indices to ``dim``-vectors: projected pooled text encoding (+ id embedding).

    ``encoder`` (a Hugging Face BERT-family model) may be ``None`` for an id-only tower.
    A fully frozen encoder's pooled outputs are computed once and cached; with
    ``unfreeze_top_layers`` only the top layers (and the projection) train.
    """

    # buffers (registered in __init__; token_ids and attention_mask only with an encoder)
    token_ids: torch.Tensor
    attention_mask: torch.Tensor
    cold: torch.Tensor

    def __init__(
        self,
        num_items: int,
        dim: int,
        encoder: PreTrainedModel | None = None,
        token_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pooling: str = "mean",
        use_id_embedding: bool = True,
        freeze_encoder: bool = True,
        unfreeze_top_layers: int = 0,
        dropout: float = 0.1,
        chunk_size: int | str = CPU_CHUNK_SIZE,
        cache_frozen_layers_max_bytes: int = 2**31,
        id_dropout: float = 0.0,
        static_width: bool = False,
        compile_encoder: bool = False,
        sparse_ids: bool = False,
    ):
        super().__init__()
        # config values are checked once, by the config schema (jobs/runtime/config/schema.py);
        # here only what needs the built encoder or the tensors
        if encoder is None and not use_id_embedding:
            raise ValueError("ItemTower: without a text encoder the id embedding is the only input (use_id_embedding=True)")
        self.num_items = num_items
        self.dim = dim
        self.pooling = pooling
        # items per encoder call: a number, or 'auto' (from the device and its free memory, once)
        self.chunk_size = chunk_size
        self._auto_chunks: dict[torch.device, int] = {}
        # True: every chunk at the catalog's token width and the same number of rows (the last
        # one padded): static shapes for torch.compile, and no read of text lengths by the host
        self.static_width = static_width
        # torch.compile the encoder (accelerators only; needs static_width for static shapes)
        self.compile_encoder = compile_encoder
        self._compiled = False
        self.encoder = encoder
        # sparse_ids: the id table's gradient holds only the rows of the step (for large catalogs;
        # the optimiser must take sparse gradients: RetrievalModule picks SparseRowAdamW)
        self.id_embedding = nn.Embedding(num_items, dim, sparse=sparse_ids) if use_id_embedding else None
        if self.id_embedding is not None:
            nn.init.normal_(self.id_embedding.weight, std=dim**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.freeze_encoder, self.unfreeze_top_layers = freeze_encoder, unfreeze_top_layers
        # training only: each item of a batch loses its id embedding with this probability, so
        # the text path alone must score it (what a cold-start item has)
        self.id_dropout = id_dropout
        self.text_proj: nn.Linear | None = None
        if encoder is not None:
            if token_ids is None or attention_mask is None or token_ids.shape[0] != num_items:
                raise ValueError("ItemTower: token_ids/attention_mask for every catalog item are required with an encoder")
            self.register_buffer("token_ids", token_ids, persistent=False)
            self.register_buffer("attention_mask", attention_mask, persistent=False)
            self.text_proj = nn.Linear(encoder.config.hidden_size, dim)
            self._apply_freezing(freeze_encoder, unfreeze_top_layers)
        # cold-start items: never trained, so their id embedding is left out (text alone)
        self.register_buffer("cold", torch.zeros(num_items, dtype=torch.bool), persistent=False)
        self.has_cold = False  # a plain flag: no device sync on the hot path
        self._text_cache: torch.Tensor | None = None
        # with only the top layers trainable, the frozen lower layers' output is computed once
        # (in eval mode) when it fits in this many bytes; the trainable layers run every step
        self.frozen_bottom = 0
        if encoder is not None and freeze_encoder and unfreeze_top_layers:
            self.frozen_bottom = len(bert_layers(encoder)) - unfreeze_top_layers
        self.cache_frozen_layers_max_bytes = cache_frozen_layers_max_bytes
        self._bottom_cache: torch.Tensor | None = None
        self.train()

    def set_cold_items(self, mask: torch.Tensor) -> None:
        """Mark items held out of training; their vectors come from their text alone."""
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.num_items,):
            raise ValueError(f"cold-item mask must have shape ({self.num_items},), got {tuple(mask.shape)}")
        self.cold = mask.to(self.cold.device)
        self.has_cold = bool(mask.any())

    @torch.no_grad()
    def add_items(self, token_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, count: int | None = None) -> torch.Tensor:
        """Grow the catalog by new items known from their text alone (cold: no trained id row).

        ``token_ids`` / ``attention_mask`` [n, w] are the new items' tokens (right-padded; any
        width: the narrower side is padded). The id embedding gains zero rows, trained rows stay
        as they are; caches of frozen encodings are extended, not recomputed. Returns the new
        items' indices."""
        if self.encoder is None:
            if token_ids is not None:
                raise ValueError("this item tower has no text encoder: new items need trained id embeddings")
            n = int(count or 0)
        else:
            if token_ids is None or attention_mask is None or token_ids.shape != attention_mask.shape:
                raise ValueError("new items need token_ids and an attention_mask of the same shape")
            n = token_ids.shape[0]
        first = self.num_items
        new = torch.arange(first, first + n, device=self.cold.device)
        if n == 0:
            return new
        if self.encoder is not None:
            assert token_ids is not None and attention_mask is not None  # checked above: an encoder needs both
            device = self.token_ids.device
            width = max(self.token_ids.shape[1], token_ids.shape[1])

            def widen(t: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.pad(t.to(device), (0, width - t.shape[1]))

            self.token_ids = torch.cat([widen(self.token_ids), widen(token_ids.to(self.token_ids.dtype))])
            self.attention_mask = torch.cat([widen(self.attention_mask), widen(attention_mask.to(self.attention_mask.dtype))])
        if self.id_embedding is not None:
            old = self.id_embedding
            grown = nn.Embedding(first + n, self.dim, device=old.weight.device, dtype=old.weight.dtype, sparse=old.sparse)
            grown.weight.zero_()
            grown.weight[:first] = old.weight
            grown.weight.requires_grad_(old.weight.requires_grad)
            self.id_embedding = grown
        self.cold = torch.cat([self.cold, torch.ones(n, dtype=torch.bool, device=self.cold.device)])
        self.has_cold = True
        self.num_items = first + n
        if self._bottom_cache is not None:
            rows = new.to(self.token_ids.device)
            cache = self._bottom_cache
            cache = torch.nn.functional.pad(cache, (0, 0, 0, self.token_ids.shape[1] - cache.shape[1]))
            self._bottom_cache = torch.cat([cache, self._bottom_states(self.token_ids[rows], self.attention_mask[rows])])
        if self._text_cache is not None:
            self._text_cache = torch.cat([self._text_cache, self.encode_text(new.to(self._text_cache.device))])
        return new

    def _apply_freezing(self, freeze: bool, unfreeze_top_layers: int) -> None:
        assert self.encoder is not None
        layers = bert_layers(self.encoder)
        if unfreeze_top_layers < 0 or unfreeze_top_layers > len(layers):
            raise ValueError(f"model.item_tower.unfreeze_top_layers must be in [0, {len(layers)}], got {unfreeze_top_layers}")
        self.encoder.requires_grad_(not freeze)
        if freeze and unfreeze_top_layers:
            for layer in layers[len(layers) - unfreeze_top_layers :]:
                layer.requires_grad_(True)
        pooler = getattr(self.encoder, "pooler", None)
        if pooler is not None:
            # the tower pools the last hidden states itself: BERT's pooler is never used
            pooler.requires_grad_(False)

    def train(self, mode: bool = True) -> ItemTower:
        """A fully frozen encoder stays in eval mode (no dropout), whatever the tower's mode.
        (Whether it is frozen is read here: after changing ``requires_grad`` by hand, call
        ``train()`` or ``eval()`` again.)"""
        super().train(mode)
        encoder = self.encoder
        self._frozen = encoder is not None and not any(p.requires_grad for p in encoder.parameters())
        if self._frozen and encoder is not None:  # frozen implies an encoder
            encoder.eval()
        return self

    @property
    def encoder_frozen(self) -> bool:
        return self._frozen

    def _pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)

    def chunk_size_on(self, device: torch.device) -> int:
        """Items per encoder call on ``device`` (``chunk_size``, or its 'auto' value there)."""
        if self.chunk_size != "auto":
            return int(self.chunk_size)
        if device not in self._auto_chunks:
            free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
            encoder = self.encoder
            config = encoder.config if encoder is not None else None
            size = CPU_CHUNK_SIZE
            if encoder is not None and config is not None:
                trainable = sum(any(p.requires_grad for p in layer.parameters()) for layer in bert_layers(encoder))
                autocast = device.type != "cpu" and torch.is_autocast_enabled(device.type)
                width = 2 if autocast else next(encoder.parameters()).element_size()
                size = auto_chunk_size(device.type, free, config.hidden_size, max(1, trainable), config.num_attention_heads, self.token_ids.shape[1], width)
            self._auto_chunks[device] = size
            log.info("item tower: %d items per encoder chunk on %s", size, device)
        return self._auto_chunks[device]

    def encode_text(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Pooled encoder output for the given (unique) items: [n, hidden]. Many items are
        encoded in chunks of similar text length, each cut to its longest text (the widths of
        all chunks are read by the host at once), or all at the catalog's width (static_width)."""
        assert self.encoder is not None
        self._maybe_compile(item_idx.device)
        size = self.chunk_size_on(item_idx.device)
        n = item_idx.numel()
        if self.static_width and n:
            width = self.token_ids.shape[1]
            padded = torch.nn.functional.pad(item_idx, (0, -n % size))  # the last chunk full-sized too
            return torch.cat([self._encode_chunk(c, width) for c in padded.split(size)])[:n]
        lengths = self.attention_mask[item_idx].sum(dim=1)
        if n <= size:
            width = int(lengths.max()) if n else 1
            return self._encode_chunk(item_idx, self._round_width(width, item_idx.device))
        order = torch.argsort(lengths, stable=True)
        last = torch.arange(size - 1, n + size - 1, size, device=item_idx.device).clamp(max=n - 1)
        widths = lengths[order][last].tolist()  # one host read for every chunk
        chunks = order.split(size)
        pooled = torch.cat([self._encode_chunk(item_idx[c], self._round_width(w, item_idx.device)) for c, w in zip(chunks, widths)])
        return pooled[torch.argsort(order)]

    def _round_width(self, width: int, device: torch.device) -> int:
        """On accelerators widths go up to a multiple of 8 (tensor cores; few distinct shapes)."""
        if device.type == "cpu":
            return max(1, width)
        return min(self.token_ids.shape[1], max(8, -(-width // 8) * 8))

    def _maybe_compile(self, device: torch.device) -> None:
        if self.compile_encoder and not self._compiled and device.type != "cpu":
            self.compile_layers(dynamic=False)
            log.info("item tower: encoder layers compiled with torch.compile")

    def compile_layers(self, **options) -> None:
        """``torch.compile`` (with ``options``) every encoder layer, in place: the state dict keeps
        its keys. The layers, not the encoder's forward: with the frozen lower layers cached, the
        trainable layers are called directly (``_run_layers``), and layers of one shape share their
        graphs (torch passes their parameters as inputs), so compile time does not grow with depth."""
        assert self.encoder is not None
        for layer in bert_layers(self.encoder):
            layer.compile(**options)
        self._compiled = True

    def _text_encoder(self) -> PreTrainedModel:
        """The encoder, on the paths that only a tower with one takes (text encoding)."""
        assert self.encoder is not None
        return self.encoder

    def _encode_chunk(self, item_idx: torch.Tensor, width: int) -> torch.Tensor:
        ids = self.token_ids[item_idx, :width]
        mask = self.attention_mask[item_idx, :width]
        bottom = self._frozen_bottom_states()
        if bottom is None:
            hidden = self._text_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            hidden = self._run_layers(bottom[item_idx, :width], mask, self.frozen_bottom)
        return self._pool(hidden, mask)

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, first: int, last: int | None = None) -> torch.Tensor:
        """Encoder layers ``first``..``last`` over hidden states (bidirectional, padding masked)."""
        encoder = self._text_encoder()
        attention = create_bidirectional_mask(config=encoder.config, inputs_embeds=hidden, attention_mask=mask)
        for layer in bert_layers(encoder)[first:last]:
            hidden = layer(hidden, attention)
        return hidden

    def _frozen_bottom_states(self) -> torch.Tensor | None:
        """Hidden states of every item after the frozen lower layers, computed once; None when
        nothing is partially frozen or the cache would not fit."""
        if not self.frozen_bottom:
            return None
        device = self.token_ids.device
        if self._bottom_cache is None or self._bottom_cache.device != device:
            size = self.token_ids.numel() * self._text_encoder().config.hidden_size * 4
            if size > self.cache_frozen_layers_max_bytes:
                return None
            self._bottom_cache = self._bottom_states(self.token_ids, self.attention_mask)
            log.info("item tower: cached the %d frozen encoder layers' output for %d items (%.0f MB)", self.frozen_bottom, self.num_items, size / 2**20)
        return self._bottom_cache

    @torch.no_grad()
    def _bottom_states(self, token_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states after the frozen lower layers (in eval mode), in chunks."""
        encoder = self._text_encoder()
        was_training = encoder.training
        encoder.eval()
        chunks = []
        size = self.chunk_size_on(token_ids.device)
        for ids, mask in zip(token_ids.split(size), attention_mask.split(size)):
            chunks.append(self._run_layers(bert_embeddings(encoder)(input_ids=ids), mask, 0, self.frozen_bottom))
        encoder.train(was_training)
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_catalog_text(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The pooled encoder output of items ``start..stop-1`` (every item by default),
        [rows, hidden], in chunks, on the buffers' device: what a fully frozen tower caches."""
        device = self.token_ids.device
        rows = torch.arange(start, self.num_items if stop is None else stop, device=device)
        return torch.cat([self.encode_text(c) for c in rows.split(self.chunk_size_on(device))])

    @property
    def frozen_text_cached(self) -> bool:
        return self._text_cache is not None

    @property
    def caches_frozen_text(self) -> bool:
        """Whether the whole text encoder is frozen, so its catalog output is computed once and cached."""
        return self.encoder is not None and self.encoder_frozen and not self.frozen_bottom

    def set_frozen_text(self, text: torch.Tensor) -> None:
        """Use ``text`` ([num_items, hidden], as :meth:`encode_catalog_text` gives it, computed once
        elsewhere, e.g. memory-mapped from a file) as the frozen encoder's cached output, so this
        tower never runs its encoder over the catalog. Only for a fully frozen encoder."""
        if not self.caches_frozen_text:
            raise ValueError("ItemTower.set_frozen_text: only a tower whose whole text encoder is frozen caches its text encodings")
        hidden = self._text_encoder().config.hidden_size
        if tuple(text.shape) != (self.num_items, hidden):
            raise ValueError(f"ItemTower.set_frozen_text: expected [{self.num_items}, {hidden}] encodings, got {list(text.shape)}")
        self._text_cache = text

    def _frozen_text(self, item_idx: torch.Tensor) -> torch.Tensor:
        if self._text_cache is None:
            self._text_cache = self.encode_catalog_text().to(item_idx.device)
            log.info("item tower: cached frozen text encodings of %d items", self.num_items)
        elif self._text_cache.device != item_idx.device:  # computed (or mapped) elsewhere: moved, not recomputed
            self._text_cache = self._text_cache.to(item_idx.device)
        dtype = self.text_proj.weight.dtype if self.text_proj is not None else self._text_cache.dtype
        return self._text_cache[item_idx].to(dtype)

    def forward(self, item_idx: torch.Tensor, dropout: bool = True, encoded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Item vectors for any-shaped index tensor: [...] -> [..., dim].

        ``dropout`` False skips the tower's dropout (scoring targets: dropout regularises the
        user tower's inputs, while noise on the vectors being scored only blurs the softmax).
        ``encoded``: (sorted distinct items [k], their pooled text encodings [k, hidden]) already
        computed (in one pass for several uses, or stale ones from a bank of negatives), covering
        every item asked for: the encoder is not run."""
        flat = item_idx.reshape(-1)
        unique, inverse = torch.unique(flat, return_inverse=True)
        out: torch.Tensor | None = None
        if self.encoder is not None:
            if encoded is not None:
                known, text = encoded
                text = text[torch.searchsorted(known, unique)]
            else:
                text = self._frozen_text(unique) if self.encoder_frozen else self.encode_text(unique)
            assert self.text_proj is not None  # built in __init__ with the encoder
            out = self.text_proj(text)
        if self.id_embedding is not None:
            ids = self.id_embedding(unique)
            if self.has_cold:
                ids = ids * (~self.cold[unique]).unsqueeze(-1).to(ids.dtype)
            if self.training and self.id_dropout and self.encoder is not None:
                keep = torch.rand(unique.shape[0], device=ids.device) >= self.id_dropout
                ids = ids * keep.unsqueeze(-1).to(ids.dtype)
            out = ids if out is None else out + ids
        assert out is not None  # __init__ requires the encoder or the id embedding
        if dropout:
            out = self.dropout(out)
        return out[inverse].reshape(*item_idx.shape, self.dim)

    @torch.no_grad()
    def all_vectors(self) -> torch.Tensor:
        """Vectors of the whole catalog, [num_items, dim], computed in chunks."""
        device = next(self.parameters()).device
        idx = torch.arange(self.num_items, device=device)
        return torch.cat([self.forward(c) for c in idx.split(self.chunk_size_on(device))])
