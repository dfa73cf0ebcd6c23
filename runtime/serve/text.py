"""Token ids → the text a client sees: whole characters only, cut before OpenAI's stop strings.

The engine thread turns each sampled token into a text delta here (:class:`TextStream`), so the
HTTP side only ever sends final text. Kept free of torch and of HTTP: pure string work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable


def stop_position(text: str, stops: Iterable[str]) -> int | None:
    """Where the earliest stop string starts in ``text`` (the output ends before it), or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: Iterable[str]) -> int:
    """How many trailing characters of ``text`` could begin a stop string: not sent yet."""
    return max(
        (k for s in stops for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])),
        default=0,
    )


class TextStream:
    """Token ids → text deltas for a stream: whole characters only, and never a stop string.

    Byte-level BPE splits characters across tokens, so text is final only once it does not end
    in U+FFFD. Decoding is incremental (vLLM's scheme): each token decodes a window of the few
    ids since the last point where the text was whole, ``ids[prefix:]``, and the window without
    the newest ids, ``ids[prefix:read]``; the difference is the new text. Re-decoding every id
    each token costs O(length) per token under the GIL, which the engine thread shares with the
    HTTP loop. Both windows start at the same id, so a decoder's start-of-text rule (a
    SentencePiece leading space) cancels out; should a tokenizer's window text not extend its
    shorter window's, the stream falls back to decoding every id.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()) -> None:
        self.decode, self.stops = decode, stops
        self.ids: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False  # a stop string was reached: the text ends before it
        self._whole = ""  # the decoded text of ids[:read]: whole characters
        self._prefix = self._read = 0  # ids[prefix:read] decode to the end of _whole
        self._incremental = True

    def feed(self, token: int) -> str:
        """Append one token; return the new final text (possibly empty)."""
        self.ids.append(token)
        if self._incremental:
            before = self.decode(self.ids[self._prefix : self._read])
            after = self.decode(self.ids[self._prefix :])
            if after.startswith(before):
                new = after[len(before) :]
                if new and not new.endswith("\ufffd"):
                    self._whole += new
                    self._prefix, self._read = self._read, len(self.ids)
                    return self._advance(self._whole, final=False)
                # A trailing U+FFFD may be an incomplete UTF-8 character: wait for its bytes.
                return self._advance(self._whole + new.rstrip("\ufffd"), final=False)
            self._incremental = False
        return self._advance(self.decode(self.ids).rstrip("\ufffd"), final=False)

    def finish(self) -> str:
        """The sequence ended (length or end-of-text): whatever was held back."""
        return "" if self.stopped else self._advance(self.decode(self.ids), final=True)

    def _advance(self, decoded: str, *, final: bool) -> str:
        cut = stop_position(decoded, self.stops)
        if cut is not None:
            self.stopped = True
            end = cut
        else:
            end = len(decoded) if final else len(decoded) - held_back(decoded, self.stops)
        end = max(end, len(self.text))  # never take back what was sent
        delta = decoded[len(self.text) : end]
        self.text += delta
        return delta
