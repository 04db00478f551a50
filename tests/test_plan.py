"""The Ray Data plan: its own block sizes, in its own DataContext."""

from __future__ import annotations


def test_a_plan_sizes_its_own_blocks() -> None:
    """Smaller blocks and more of them ahead, in the plan's own DataContext: a smaller size
    set before is kept, and the process's context is left as it was."""
    import ray

    from pipeline.plan import PLAN_BLOCK_BYTES, TASK_BLOCKS_AHEAD, size_blocks

    process = ray.data.DataContext.get_current()
    ahead = "_max_num_blocks_in_streaming_gen_buffer"
    # A private field: this fails if a Ray upgrade drops it, rather than setting a dead one.
    assert ahead in vars(ray.data.DataContext())
    before = (process.target_max_block_size, getattr(process, ahead))
    dataset = ray.data.from_items([{"x": 1}])
    size_blocks(dataset.context)
    assert dataset.context.target_max_block_size == PLAN_BLOCK_BYTES < 128 * 2**20
    assert getattr(dataset.context, ahead) == TASK_BLOCKS_AHEAD > 2
    assert (process.target_max_block_size, getattr(process, ahead)) == before
    small = ray.data.DataContext()
    small.target_max_block_size = 16 * 1024
    size_blocks(small)
    assert small.target_max_block_size == 16 * 1024
