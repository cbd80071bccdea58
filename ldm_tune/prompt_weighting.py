"""Prompt emphasis and prompts past the text encoder's 77 tokens, as AUTOMATIC1111 reads them; and `clip_skip`.

Syntax (A1111 `modules/prompt_parser.py`, `parse_prompt_attention`, also copied in diffusers'
`examples/community/lpw_stable_diffusion.py`): `(a)` weighs `a` by 1.1, `((a))` by 1.21, `[a]` by 1 / 1.1,
`(a:1.5)` by 1.5; `\\(`, `\\)`, `\\[`, `\\]` and `\\\\` are the literal characters; an unclosed bracket weighs the
rest of the prompt and a stray closing one is kept as text (as in A1111); `BREAK` starts a new chunk. A literal
parenthesis a prompt should keep must be escaped: "a (red) car" weighs "red" by 1.1.

`compel` is not used: its syntax is `word+`, `word-` and `(words)1.2`, not A1111's, so prompts copied from A1111,
civitai or a PNG's `parameters` text would mean something else.

Long prompts (A1111 `modules/sd_hijack_clip.py`, `FrozenCLIPEmbedderWithCustomWordsBase`): the tokens go in chunks
of 75 (the tokenizer's `model_max_length` - 2), each wrapped `BOS .. EOS`, padded to 77 and encoded on its own; the
chunks' hidden states are concatenated along the sequence axis, which the UNet's cross-attention takes at any length.
As A1111 (its `comma_padding_backtrack` default), a chunk that fills up within 20 tokens of a comma ends at that
comma, so a phrase is not cut in two. Every prompt and negative prompt of one call is padded to the same number of
chunks with the encoding of an empty chunk (A1111 `empty_chunk`, and the negative's padding in
`sd_samplers_cfg_denoiser.pad_cond`), as CFG stacks them in one batch.

Weights multiply each token's hidden state, then the chunk's mean is restored (A1111 `sd_emphasis.EmphasisOriginal`:
`z *= multipliers; z *= original_mean / new_mean`). A1111 takes that mean over the whole batch of prompts; here
it is taken per prompt and chunk, so that an image does not depend on the prompts batched beside it.

A prompt without emphasis syntax that fits one chunk takes the plain path of diffusers' `StableDiffusionPipeline`
(one padded, truncating tokenizer call): its embeddings, and so its images, are exactly those of diffusers.
"""

from __future__ import annotations

import re

import torch


ROUND_MULTIPLIER = 1.1  # (a)
SQUARE_MULTIPLIER = 1 / 1.1  # [a]
# A1111's opts.comma_padding_backtrack default: how far back from a full chunk a comma may end it instead.
COMMA_BACKTRACK = 20
BREAK = ("BREAK", -1.0)  # A1111's marker of a forced chunk end in the parsed list

# A1111's tokens, in order of preference: escapes, brackets, a closing weight `:1.5)`, plain text, a lone ':'.
_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) pieces, A1111's `parse_prompt_attention` (`BREAK` is `("BREAK", -1.0)`).

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]

    Raises:
        ValueError: a weight such as `(a:1.2.3)` that is not a number.
    """
    pieces: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, multiplier: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            multiply_from(round_open.pop(), _weight(weight, text))
        elif token == ")" and round_open:
            multiply_from(round_open.pop(), ROUND_MULTIPLIER)
        elif token == "]" and square_open:
            multiply_from(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    pieces.append(list(BREAK))
                pieces.append([part, 1.0])
    # Unclosed brackets weigh everything after them (A1111: "(unbalanced" -> [["unbalanced", 1.1]]).
    for start in round_open:
        multiply_from(start, ROUND_MULTIPLIER)
    for start in square_open:
        multiply_from(start, SQUARE_MULTIPLIER)
    return _merge_equal_weights(pieces or [["", 1.0]])


def _weight(value: str, prompt: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"`prompt` has the weight {value!r}, which is not a number, in {prompt!r}.") from None


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        # BREAK markers are never merged (A1111 would merge two adjacent ones into the text "BREAKBREAK").
        if merged and merged[-1][1] == weight and weight != BREAK[1]:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def is_plain(text: str) -> bool:
    """True when the prompt has no emphasis, escape or BREAK: it is read as the very text it is."""
    return parse_prompt_attention(text) == [(text, 1.0)]


def _chunk_tokens(tokenizer, text: str, chunk_length: int) -> list[tuple[list[int], list[float]]]:
    """The prompt's (token ids, weights) in chunks of at most `chunk_length`, without BOS/EOS (A1111
    `tokenize_line`, without textual-inversion embeddings)."""
    parsed = parse_prompt_attention(text)
    ids_of = tokenizer([piece for piece, _ in parsed], add_special_tokens=False, verbose=False).input_ids
    comma = tokenizer.get_vocab().get(",</w>")
    chunks, ids, weights, last_comma = [], [], [], -1
    for piece_ids, (piece, weight) in zip(ids_of, parsed, strict=True):
        if (piece, weight) == BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in piece_ids:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == chunk_length and last_comma != -1 and len(ids) - last_comma <= COMMA_BACKTRACK:
                # The chunk is full a few tokens after a comma: end it at the comma, carry the rest over.
                cut = last_comma + 1
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == chunk_length:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def _wrap(tokenizer, ids: list[int], weights: list[float], chunk_length: int) -> tuple[list[int], list[float]]:
    # BOS .. EOS then padding, as the tokenizer pads the plain path (SD 1.x pads with EOS, SD 2.x with "!"; A1111
    # does the same for both, see `process_tokens`).
    padding = chunk_length - len(ids)
    row = [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * padding
    return row, [1.0, *weights, 1.0] + [1.0] * padding


def encode_token_ids(text_encoder, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states of the text encoder for token ids; with `clip_skip`, those of `clip_skip` layers before the
    last, through the final layer norm (as `StableDiffusionPipeline.encode_prompt`)."""
    ids = ids.to(text_encoder.device)
    if clip_skip is None:
        return text_encoder(ids)[0]
    hidden = text_encoder(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
    # transformers 5 put `final_layer_norm` on CLIPTextModel itself; 4.x had it under `.text_model` (where diffusers
    # 0.42's clip_skip path still looks, and fails with transformers 5).
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def apply_weights(embeds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Multiply each token's hidden state by its weight, then restore each row's mean (A1111 `EmphasisOriginal`)."""
    original_mean = embeds.mean(dim=(1, 2), keepdim=True)
    weighted = embeds * weights.to(embeds)[..., None]
    return weighted * (original_mean / weighted.mean(dim=(1, 2), keepdim=True))


def chunk_length_of(tokenizer, text_encoder) -> int:
    """Prompt tokens per chunk: the text encoder's context (77 for CLIP) less BOS and EOS."""
    context = min(tokenizer.model_max_length, text_encoder.config.max_position_embeddings)
    return context - 2


def encode_weighted_prompts(tokenizer, text_encoder, texts: list[str], clip_skip: int | None = None) -> torch.Tensor:
    """Embeddings `(len(texts), chunks * 77, hidden)` of prompts with A1111 emphasis, of any length.

    All plain prompts of one chunk: diffusers' exact path. Otherwise every chunk of every text is encoded in one
    batch, weighted, and each text padded to the longest with the encoding of an empty chunk.
    """
    chunk_length = chunk_length_of(tokenizer, text_encoder)
    context = chunk_length + 2
    if all(is_plain(text) for text in texts):
        lengths = [len(ids) for ids in tokenizer(texts, verbose=False).input_ids]
        if max(lengths) <= context:
            padded = tokenizer(texts, padding="max_length", max_length=context, truncation=True, return_tensors="pt")
            return encode_token_ids(text_encoder, padded.input_ids, clip_skip)
    chunked = [_chunk_tokens(tokenizer, text, chunk_length) for text in texts]
    rows = [_wrap(tokenizer, ids, weights, chunk_length) for chunks in chunked for ids, weights in chunks]
    rows.append(_wrap(tokenizer, [], [], chunk_length))  # the empty chunk, for padding
    ids = torch.tensor([row for row, _ in rows])
    weights = torch.tensor([row_weights for _, row_weights in rows])
    embeds = apply_weights(encode_token_ids(text_encoder, ids, clip_skip), weights)
    empty, count = embeds[-1], max(len(chunks) for chunks in chunked)
    per_text, start = [], 0
    for chunks in chunked:
        own = list(embeds[start : start + len(chunks)]) + [empty] * (count - len(chunks))
        per_text.append(torch.cat(own, dim=0))
        start += len(chunks)
    return torch.stack(per_text)
