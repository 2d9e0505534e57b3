"""Tiny, randomly initialised models built and saved by the tests themselves (no network).

They exercise the real loading and generation code on models small enough to load instantly:
a Llama-style causal chat model with a ChatML template, and a Blenderbot seq2seq model.
"""

from pathlib import Path

WORDS = (
    "hello hi how are you i am fine what is the capital of france paris germany berlin my name "
    "tell me about yourself a an and or to in on it this that thanks good bye yes no please"
).split()
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _word_tokenizer(special_tokens: list[str], **names):
    """A fast tokenizer with one token per known word (unknown words map to <unk>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*special_tokens, "\n", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **names)


def _special_token_ids(tokenizer) -> dict[str, int]:
    """A model configuration's ids of the tokenizer's start, end and padding tokens."""
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_causal(path: Path, *, context_window: int = 64) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = _word_tokenizer(
        ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"],
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context_window,
        **_special_token_ids(tokenizer),
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_blenderbot(path: Path) -> Path:
    import torch
    from transformers import BlenderbotConfig, BlenderbotForConditionalGeneration

    tokenizer = _word_tokenizer(
        ["<s>", "<pad>", "</s>", "<unk>"],
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
    )
    torch.manual_seed(0)
    config = BlenderbotConfig(
        vocab_size=len(tokenizer),
        d_model=16,
        **{  # the encoder and the decoder the same size
            f"{side}_{name}": size
            for side in ("encoder", "decoder")
            for name, size in [("layers", 1), ("attention_heads", 2), ("ffn_dim", 32)]
        },
        max_position_embeddings=32,
        **_special_token_ids(tokenizer),
        decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    BlenderbotForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
