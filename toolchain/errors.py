"""User mistakes: one exception type (the CLI prints its message as one line and exits 2), and the checks of user
input that every backend shares."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (file, argument, model). Message: what is wrong and what to do."""


def check_token_ids(ids, vocab: int, what: str = "token id") -> list[int]:
    """`ids` as a list of ints, each in [0, vocab). Every backend calls this before any kernel runs: numpy would read a
    negative id as a row from the end, and a kernel would read past its tensors for one >= vocab."""
    import numpy as np

    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise UserError(f"{what}s must be a flat sequence of integers, got {type(ids).__name__} of {arr.dtype} "
                        f"with shape {arr.shape}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab))
    if bad.size:
        raise UserError(f"{what} {int(arr[bad[0]])} at index {int(bad[0])} is outside the vocabulary [0, {vocab}): "
                        "give ids the model's tokenizer produced")
    return [int(i) for i in arr]


def check_range(values, upper: int, what: str) -> None:
    """Each of `values` in [0, upper): slots and positions of a step, before a kernel indexes the KV cache with them."""
    import numpy as np

    arr = np.asarray(values).reshape(-1)
    bad = np.flatnonzero((arr < 0) | (arr >= upper))
    if bad.size:
        raise UserError(f"{what} {int(arr[bad[0]])} at index {int(bad[0])} is outside [0, {upper})")


def check_step(ids, positions, slots, vocab: int, max_context: int, n_slots: int) -> list[int]:
    """The checks every backend's step makes before any kernel runs: token ids in the vocabulary, positions in the
    context, slots among the KV-cache slots. Returns the ids as a list of ints."""
    ids = check_token_ids(ids, vocab)
    check_range(positions, max_context, "position")
    check_range(slots, n_slots, "slot")
    return ids
