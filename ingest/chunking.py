"""Token-aware, structure-aware chunking (pure functions over loaded blocks).

Sizes are counted with the embedding model's own tokenizer so that no chunk is silently
truncated by the embedder. Blocks (pages, heading sections) are never merged, so a chunk
never spans two pages or two sections.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.loaders import Block

# Paragraphs, lines, sentences, words; never inside a word unless a "word" exceeds a chunk.
SEPARATORS = ["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", ""]


@dataclass
class Chunk:
    text: str
    start_char: int
    end_char: int
    page: int | None
    heading: str
    index: int


def embedding_text(title: str, heading: str, text: str) -> str:
    """What the embedder sees: the chunk with its document title and heading path."""
    context = " > ".join(p for p in (title, heading) if p and p != title) or title
    if heading and heading.startswith(title):
        context = heading
    return f"{context}\n{text}" if context else text


def chunk_blocks(
    blocks: list[Block],
    count_tokens: Callable[[str], int],
    size_tokens: int,
    overlap_tokens: int,
) -> list[Chunk]:
    splitter = RecursiveCharacterTextSplitter(
        separators=SEPARATORS,
        chunk_size=size_tokens,
        chunk_overlap=overlap_tokens,
        length_function=count_tokens,
        keep_separator="end",
        strip_whitespace=True,
    )
    chunks: list[Chunk] = []
    for block in blocks:
        # Offsets are found here: the splitter's own add_start_index mixes token counts
        # with character offsets when the length function counts tokens.
        cursor = 0
        for text in splitter.split_text(block.text):
            found = block.text.find(text, cursor)
            local = found if found >= 0 else block.text.find(text)
            cursor = local + 1
            start = block.start_char + local
            chunks.append(Chunk(text, start, start + len(text), block.page, block.heading,
                                len(chunks)))
    return chunks
