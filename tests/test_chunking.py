"""Action-chunk bookkeeping: replanning and ACT temporal ensembling."""

import numpy as np
import pytest

from runners.chunking import ChunkExecutor, ensemble_action


def chunk(start, n=10):
    c = np.zeros((n, 7))
    c[:, 0] = start + np.arange(n)  # value = the step it was predicted for, if started at `start`
    return c


def test_replan_executes_the_first_replan_steps_of_each_chunk():
    ex = ChunkExecutor(replan=3)
    executed, asked = [], []
    for t in range(8):
        if ex.needs_chunk():
            asked.append(t)
            ex.add_chunk(chunk(100 * len(asked)))
        executed.append(ex.next_action()[0])
    assert asked == [0, 3, 6]
    assert executed == [100, 101, 102, 200, 201, 202, 300, 301]


def test_replan_longer_than_the_chunk_is_an_error():
    ex = ChunkExecutor(replan=6)
    with pytest.raises(ValueError, match="replan <= 5"):
        ex.add_chunk(chunk(0, n=5))


def test_asking_for_an_action_without_a_chunk_raises():
    with pytest.raises(RuntimeError):
        ChunkExecutor(replan=2).next_action()


def test_unknown_mode_lists_the_choices():
    with pytest.raises(ValueError, match="replan, ensemble"):
        ChunkExecutor(chunking="average")


def test_ensemble_weights_on_a_known_sequence():
    m = 0.5
    # chunk A from step 0 predicts 10+t, chunk B from step 2 predicts 20+t, chunk C from step 4 predicts 30+t
    chunks = [(0, np.array([[10.0 + t] for t in range(6)])), (2, np.array([[20.0 + t] for t in range(2, 8)])),
              (4, np.array([[30.0 + t] for t in range(4, 10)]))]
    # step 5: A says 15, B says 25, C says 35; weights 1, e^-0.5, e^-1 (oldest first)
    w = np.exp(-m * np.arange(3))
    assert ensemble_action(chunks, 5, m)[0] == pytest.approx((w @ [15, 25, 35]) / w.sum())
    # step 1: only A covers it
    assert ensemble_action(chunks, 1, m)[0] == pytest.approx(11.0)
    # step 7: A has ended; B (older) then C
    w2 = np.exp(-m * np.arange(2))
    assert ensemble_action(chunks, 7, m)[0] == pytest.approx((w2 @ [27, 37]) / w2.sum())


def test_ensemble_executor_averages_overlapping_chunks():
    ex = ChunkExecutor(replan=2, chunking="ensemble", ensemble_m=0.0)  # m = 0: plain mean
    out = []
    for t in range(6):
        if ex.needs_chunk():
            ex.add_chunk(chunk(0, n=4) + 1000 * (t // 2))  # chunk k adds 1000 k to the step's value
        out.append(ex.next_action()[0])
    # step t is covered by chunks started at t-3..t (every 2 steps, length 4)
    assert out[0] == 0 and out[1] == 1
    assert out[2] == pytest.approx(np.mean([2, 1000 + 0]))
    assert out[5] == pytest.approx(np.mean([3 + 1000, 1 + 2000]))


def test_ensemble_with_replan_one_is_acts_scheme():
    ex = ChunkExecutor(replan=1, chunking="ensemble", ensemble_m=0.01)
    for t in range(5):
        assert ex.needs_chunk()
        ex.add_chunk(np.full((3, 7), float(t)))
        a = ex.next_action()[0]
        preds = [s for s in range(max(0, t - 2), t + 1)]
        w = np.exp(-0.01 * np.arange(len(preds)))
        assert a == pytest.approx((w @ preds) / w.sum())
