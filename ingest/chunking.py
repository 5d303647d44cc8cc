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
    page_end: int | None = None


def embedding_text(title: str, heading: str, text: str) -> str:
    """What the embedder sees: the chunk with its document title and heading path."""
    context = " > ".join(p for p in (title, heading) if p and p != title) or title
    if heading and heading.startswith(title):
        context = heading
    return f"{context}\n{text}" if context else text


def merge_short_pages(blocks: list[Block], count_tokens: Callable[[str], int],
                      size_tokens: int) -> list[Block]:
    """Join consecutive pages while they fit in one chunk together (recording the range);
    a page longer than a chunk always stands alone, so its chunks never span pages."""
    out: list[Block] = []
    for b in blocks:
        prev = out[-1] if out else None
        if (prev is not None and b.page is not None and prev.page is not None
                and b.start_char == prev.start_char + len(prev.text) + 1
                and count_tokens(prev.text) + count_tokens(b.text) <= size_tokens):
            out[-1] = Block(prev.text + "\n" + b.text, prev.start_char, prev.page,
                            prev.heading, b.page_end or b.page)
        else:
            out.append(b)
    return out


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
    for block in merge_short_pages(blocks, count_tokens, size_tokens):
        # Offsets are found here: the splitter's own add_start_index mixes token counts
        # with character offsets when the length function counts tokens.
        cursor = 0
        for text in splitter.split_text(block.text):
            found = block.text.find(text, cursor)
            local = found if found >= 0 else block.text.find(text)
            cursor = local + 1
            start = block.start_char + local
            chunks.append(Chunk(text, start, start + len(text), block.page, block.heading,
                                len(chunks), block.page_end or block.page))
    return chunks
