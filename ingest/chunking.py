"""Token-aware, structure-aware chunking (pure functions over loaded blocks).

Sizes are counted with the embedding model's own tokenizer so that no chunk is silently
truncated by the embedder. Blocks (pages, heading sections) are never merged, so a chunk
never spans two pages or two sections. A code block that fits in a chunk is never cut; a
larger one is cut between its lines.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langchain_text_splitters import RecursiveCharacterTextSplitter

from ingest.loaders import Block

# Paragraphs, lines, sentences, words; never inside a word unless a "word" exceeds a chunk.
SEPARATORS = ["\n\n", "\n", ". ", "? ", "! ", "; ", ", ", " ", ""]
# A token stands for at least one UTF-8 byte (WordPiece: at least one character; byte-level
# BPE: at least one byte), plus at most one word-start marker (SentencePiece's "▁"): a piece
# of at most N - 2 bytes is fewer than N tokens, whatever the embedder's tokenizer.
MARKER_TOKENS = 2
# Stand-ins for the line breaks of a code block while it is split: whitespace to the
# tokenizers (no token more than a line break costs, for WordPiece none) but no separator
# of the splitter, so it never cuts the block. The first not in the text is taken.
_CODE_BREAKS = ("\u00a0", "\u2007", "\u202f", "\u2009", "\u200a")


class LinearSplitter(RecursiveCharacterTextSplitter):
    """LangChain's recursive splitter, except for text without any separator (a run of
    letters with no space: CJK prose, base64, minified code). There the last resort, "",
    would cut it into single characters and count the tokens of each (three tokenizer calls
    per character: minutes for a few hundred KB); this cuts it into pieces of at most
    `piece_bytes` UTF-8 bytes instead, each fewer tokens than a chunk by the bound above,
    counts each piece once and joins neighbours into chunks: one tokenizer call per piece."""

    def __init__(self, piece_bytes: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._piece_bytes = piece_bytes

    def _split_text(self, text: str, separators: list[str]) -> list[str]:
        if any(s and s in text for s in separators):
            return super()._split_text(text, separators)
        pieces = utf8_pieces(text, self._piece_bytes)
        lengths = [self._length_function(p) for p in pieces]
        if max(lengths, default=0) >= self._chunk_size:
            # a tokenizer beyond the bound: the per-character last resort, piece by piece
            return [c for p in pieces for c in super()._split_text(p, [""])]
        chunks = join_pieces(pieces, lengths, self._chunk_size, self._chunk_overlap)
        if self._strip_whitespace:
            chunks = [c.strip() for c in chunks]
        return [c for c in chunks if c]


def join_pieces(pieces: list[str], lengths: list[int], size: int, overlap: int) -> list[str]:
    """Consecutive pieces joined into chunks of at most `size` (summed `lengths`), each
    chunk starting with the last pieces of the one before that fit in `overlap`."""
    chunks: list[str] = []
    start = 0
    while start < len(pieces):
        end, total = start, 0
        while end < len(pieces) and total + lengths[end] <= size:
            total += lengths[end]
            end += 1
        end = max(end, start + 1)
        chunks.append("".join(pieces[start:end]))
        if end == len(pieces):
            break
        back, tail = end, 0
        while back - 1 > start and tail + lengths[back - 1] <= overlap:
            back -= 1
            tail += lengths[back]
        start = back
    return chunks


def utf8_pieces(text: str, max_bytes: int) -> list[str]:
    """`text` cut into consecutive pieces of at most `max_bytes` UTF-8 bytes (at least one
    character each), never inside a character; linear in the text."""
    data = text.encode("utf-8")
    pieces, start = [], 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        while end < len(data) and end > start and data[end] & 0xC0 == 0x80:
            end -= 1  # back to the first byte of a character
        if end == start:  # max_bytes smaller than one character: take the character
            end = start + 1
            while end < len(data) and data[end] & 0xC0 == 0x80:
                end += 1
        pieces.append(data[start:end].decode("utf-8"))
        start = end
    return pieces


@dataclass
class Chunk:
    text: str
    start_char: int
    end_char: int
    page: int | None
    heading: str
    index: int
    page_end: int | None = None
    page_label: str | None = None


def embedding_text(title: str, heading: str, text: str) -> str:
    """What the embedder sees: the chunk below a line naming where it is, the document's
    title and heading path ("git-rebase - Reapply commits on top of another base tip >
    OPTIONS"). The title is left out where the path already starts with it: the path's
    first part is the title, or the title plus a site suffix ("json — JSON encoder and
    decoder" of "json — JSON encoder and decoder — Python 3.11.2 documentation")."""
    top = heading.split(" > ", 1)[0]
    if not heading:
        context = title
    elif not title or heading.startswith(title) or _title_is(top, title):
        context = heading
    else:
        context = f"{title} > {heading}"
    return f"{context}\n{text}" if context else text


def _title_is(top: str, title: str) -> bool:
    """Is `title` the heading `top`, bar a suffix after a separator (" — Python docs")?"""
    rest = title[len(top):] if title.startswith(top) else None
    return rest is not None and (not rest.strip() or rest[:3].strip() in _TITLE_SEPARATORS)


_TITLE_SEPARATORS = {"—", "–", "-", "|", ":", "·"}


def join_blocks(blocks: list[Block], count_tokens: Callable[[str], int],
                      size_tokens: int) -> list[Block]:
    """Join consecutive pages while they fit in one chunk together (recording the range);
    a page longer than a chunk always stands alone, so its chunks never span pages. Join
    definition-list entries (`Block.joins`) to the block before them in their section the
    same way, so chunks end between entries."""
    out: list[Block] = []
    tokens: list[int] = []  # of each block of `out`
    for b in blocks:
        prev = out[-1] if out else None
        n = count_tokens(b.text)
        if prev is not None and n + tokens[-1] <= size_tokens and _pages_join(prev, b):
            out[-1] = Block(prev.text + "\n" + b.text, prev.start_char, prev.page,
                            prev.heading, b.page_end or b.page, prev.page_label)
            tokens[-1] += n
        elif prev is not None and n + tokens[-1] <= size_tokens and _entries_join(prev, b):
            shift = len(prev.text) + 2
            out[-1] = Block(prev.text + "\n\n" + b.text, prev.start_char, heading=prev.heading,
                            code=prev.code + [(a + shift, z + shift) for a, z in b.code],
                            joins=prev.joins)
            tokens[-1] += n
        else:
            out.append(b)
            tokens.append(n)
    return out


def _pages_join(prev: Block, b: Block) -> bool:
    return (b.page is not None and prev.page is not None
            and b.start_char == prev.start_char + len(prev.text) + 1)


def _entries_join(prev: Block, b: Block) -> bool:
    return (b.joins and b.page is None and prev.page is None and b.heading == prev.heading
            and b.start_char == prev.start_char + len(prev.text) + 2)


def protect_code(block: Block, count_tokens: Callable[[str], int], size_tokens: int
                 ) -> tuple[str, str | None]:
    """The block's text with the line breaks of each code block that fits in a chunk
    replaced by a stand-in (returned; None: nothing replaced), so the splitter keeps it
    whole: it cuts at paragraphs, lines, sentences and words, and a block without line
    breaks is one line. A code block larger than a chunk keeps its breaks, to be cut there."""
    mark = next((c for c in _CODE_BREAKS if c not in block.text), None)
    text, protected = block.text, False
    for a, b in block.code:
        code = text[a:b]
        if mark is not None and "\n" in code and count_tokens(code) <= size_tokens:
            text = text[:a] + code.replace("\n", mark) + text[b:]
            protected = True
    return text, mark if protected else None


def locate(block: str, text: str, prev_start: int, prev_end: int) -> int:
    """Where a chunk starts in its block: after the previous chunk's start and at most at
    its end (chunks overlap or touch, but for whitespace stripped between them). In a
    repetitive text ('aaaa…') several places hold the same text: the latest is taken, and
    once past the end, the last place in the block. Linear in the chunk."""
    at = block.rfind(text, prev_start + 1, prev_end + len(text))
    if at < 0:
        at = block.find(text, prev_end)
    return at if at >= 0 else block.rfind(text)


def chunk_blocks(
    blocks: list[Block],
    count_tokens: Callable[[str], int],
    size_tokens: int,
    overlap_tokens: int,
) -> list[Chunk]:
    # Pieces about the overlap's size (so neighbours overlap inside a run too) and at most
    # 64 bytes: counted alone, each is tokenized as text (WordPiece reads a word of more
    # than 100 characters as one unknown token, whatever its length).
    piece_bytes = min(max(16, min(overlap_tokens, 64)), size_tokens - MARKER_TOKENS)
    splitter = LinearSplitter(
        piece_bytes,
        separators=SEPARATORS,
        chunk_size=size_tokens,
        chunk_overlap=overlap_tokens,
        length_function=count_tokens,
        keep_separator="end",
        strip_whitespace=True,
    )
    chunks: list[Chunk] = []
    for block in join_blocks(blocks, count_tokens, size_tokens):
        # Offsets are found here: the splitter's own add_start_index mixes token counts
        # with character offsets when the length function counts tokens.
        prev_start, prev_end = -1, 0
        protected, mark = protect_code(block, count_tokens, size_tokens)
        for piece in splitter.split_text(protected):
            text = piece.replace(mark, "\n") if mark else piece
            local = locate(block.text, text, prev_start, prev_end)
            prev_start, prev_end = local, local + len(text)
            start = block.start_char + local
            chunks.append(Chunk(text, start, start + len(text), block.page, block.heading,
                                len(chunks), block.page_end or block.page, block.page_label))
    return chunks
