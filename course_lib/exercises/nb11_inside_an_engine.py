"""Exercise checks of notebooks/11_inside_an_engine.ipynb: each compares an answer with what the
real engine did (its snapshots or its request metrics), says what is wrong, never the answer.
"""

from __future__ import annotations

from ..errors import InputError


def _not_answered(answer) -> bool:
    if answer is None:
        print("not answered yet")
        return True
    return False


def check_slot_of(slot_of, snapshots, block_size: int) -> None:
    """``slot_of(block_table, position, block_size)`` must give the slot the engine wrote that
    position's K/V to, for every new token of every recorded step."""
    if _not_answered(slot_of):
        return
    if not snapshots:
        raise InputError("give the snapshots of a run (LLM(..., snapshot=True))")
    checked = 0
    for snap in snapshots:
        for i, s in enumerate(snap.scheduled):
            table = snap.block_tables.get(s["request_id"])
            if table is None:               # finished in this step: its blocks are already freed
                continue
            for k in range(s["num_tokens"]):
                pos = s["start"] + k
                got = slot_of(list(table), pos, block_size)
                if got is None:
                    print("not answered yet")
                    return
                want = snap.slot_mapping[snap.query_start[i] + k]
                assert got == want, (
                    f"step {snap.step}, position {pos} with block table {table}: slot {got} is not where "
                    "the engine wrote it. Which entry of the table holds this position, and where inside "
                    "that block does it sit?")
                checked += 1
    assert checked, "the snapshots hold no token to check"
    print("correct")


def check_cached_tokens(answer, llm, served_ids: list[int], new_ids: list[int]) -> None:
    """``answer``: prompt tokens of ``new_ids`` the prefix cache supplies right after ``served_ids``
    was served by ``llm`` (prefix caching on)."""
    if _not_answered(answer):
        return
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
        raise AssertionError(f"give a whole number of tokens (>= 0), got {answer!r}")
    from ..engine import SamplingParams

    p = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([served_ids], p)
    measured = llm.generate([new_ids], p)[0].metrics.num_cached_tokens
    bs = llm.engine.block_manager.block_size
    if answer != measured:
        if answer % bs:
            raise AssertionError(f"{answer} is not what the engine reused: the cache works in whole blocks "
                                 f"of {bs} tokens")
        if answer > measured:
            raise AssertionError(f"{answer} tokens is more than the engine reused: a block is reused only "
                                 "when every token in it, and every block before it, match")
        raise AssertionError(f"{answer} tokens is less than the engine reused: every block that matches "
                             "completely is reused")
    print("correct")


def check_idle_slots(answer, llm, prompts: list, params: list, group_size: int) -> None:
    """``answer``: slot-steps that static batching in groups of ``group_size`` leaves empty on this
    workload, counted from the engine's snapshots of a real run."""
    if _not_answered(answer):
        return
    if isinstance(answer, bool) or not isinstance(answer, int) or answer < 0:
        raise AssertionError(f"give a whole number of slot-steps (>= 0), got {answer!r}")
    from ..widgets.engine import static_batching

    measured = static_batching(llm, prompts, params, group_size).idle_slots()
    assert answer == measured, (
        f"{answer} is not the number of empty slot-steps the engine's snapshots show. In each group, a "
        "request keeps its slot from the group's first step to its last, and a group lasts as long as "
        "its longest request needs steps")
    print("correct")
