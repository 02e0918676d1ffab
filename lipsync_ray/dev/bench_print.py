"""What the ``lipsync-ray bench`` commands print: their results as text tables and lines.

Kept apart from the measuring code (``lipsync_ray.dev.bench``) and the argument parsing
(``lipsync_ray.cli``); each function takes the benchmark's result values and only prints.
"""

from __future__ import annotations

from collections.abc import Sequence


def print_inference_bench(results: Sequence) -> None:
    """``bench inference``'s table: one ``bench.InferenceBench`` per batch size."""
    print(f"{'batch':>5} {'ms/frame':>9} {'FPS':>7}  provider, threads")
    for r in results:
        print(f"{r.batch:>5} {r.ms_per_frame:>9.1f} {r.fps:>7.2f}  {r.provider}, {r.threads}")


def print_encode_bench(
    results: Sequence, *, avatar: str, crf: int, baseline=None, default=None, chosen=None
) -> None:
    """``bench encode``'s markdown table: one ``bench_encode.EncodeBench`` per setting.
    ``baseline`` (a result) adds a column of CPU ratios to it; ``default`` (the render's
    setting) is marked; ``chosen`` (a result) is named below the table."""
    r0 = results[0]
    print(f"{avatar} footage, {r0.frames} frames, CRF {crf}, 1 thread, 64-frame segments; CPU: "
          f"median of {r0.repeats}; quality against the encoder's yuv420p input\n")  # fmt: skip
    ratio = f" CPU vs {baseline.label} |" if baseline is not None else ""
    print(f"| x264 setting | CPU ms/frame |{ratio} Mbit/s | PSNR dB (worst) | SSIM Y (worst) |")
    print("| --- | ---: |" + (" ---: |" if baseline is not None else "") + " ---: | --- | --- |")
    for r in results:
        mark = " (default)" if default is not None and r.label == default.label else ""
        cells = [f"{r.label}{mark}", f"{r.cpu_ms_per_frame:.1f}"]
        if baseline is not None:
            cells.append(f"{r.cpu_ms_per_frame / baseline.cpu_ms_per_frame:.2f}x")
        cells += [
            f"{r.mbit_per_s:.2f}",
            f"{r.psnr_db:.2f} ({r.worst_psnr_db:.2f})",
            f"{r.ssim:.4f} ({r.worst_ssim:.4f})",
        ]
        print("| " + " | ".join(cells) + " |")
    if chosen is not None and baseline is not None:
        print(f"\ncheapest with {baseline.label}'s bit rate (5 %) and quality (0.1 dB PSNR, "
              f"0.001 SSIM), CPU within 3 % counted as a tie won by fewer options: "
              f"{chosen.label}, {chosen.cpu_ms_per_frame / baseline.cpu_ms_per_frame:.2f}x "
              "its CPU")  # fmt: skip


def print_render_bench(r, first) -> None:
    """One ``bench render`` run (a ``bench.RenderBench``); ``first`` is the first run of the
    command, whose bare figure is used when ``r`` has none."""
    print(f"== {r.model} model, {r.avatar} avatar, {r.seconds:g} s of audio, {r.frames} frames "
          f"at {r.size_wh[0]}x{r.size_wh[1]} ==")  # fmt: skip
    if r.bare:
        print(f"bare inference after {r.settings['bare_warmup_s']:g} s of untimed warm-up:")
    for b in r.bare:
        print(f"bare inference batch {b.batch}: {b.fps:.2f} FPS ({b.ms_per_frame:.1f} ms/frame, "
              f"{b.threads} threads)")  # fmt: skip
    if r.bare_after is not None:
        print(f"bare inference batch {r.bare_after.batch} after the render: "
              f"{r.bare_after.fps:.2f} FPS; bare figure used: {r.bare_fps:.2f} FPS (mean of "
              f"before and after)")  # fmt: skip
    reduced = r.precision.get("precision", "fp32")
    for b in r.bare_reduced:
        print(f"bare {reduced} inference batch {b.batch}: {b.fps:.2f} FPS "
              f"({b.ms_per_frame:.1f} ms/frame, {b.threads} threads)")  # fmt: skip
    bare = r.bare_fps or first.bare_fps
    ratio = r.e2e_fps / bare if bare else 0.0
    print(f"lipsync-ray render, whole process: {r.e2e_fps:.2f} FPS ({r.wall_s:.1f} s from start "
          f"to exit, batch {r.render_batch})")  # fmt: skip
    print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r.phases_s.items())
          + " (ray_init is inside start)")  # fmt: skip
    chunks_s = r.phases_s.get("chunks", 0.0)
    if chunks_s > 0:
        print(f"  steady state (chunks phase): {r.frames / chunks_s:.2f} FPS")
    actors = (r.settings.get("pool_resolved") or {}).get("inference_actors")
    session_ms = r.stage_wall_ms_per_frame.get("inference", 0.0)  # the turns on the sessions
    if chunks_s > 0 and actors and session_ms:
        busy = session_ms * r.frames / 1000 / actors / chunks_s
        print(f"  inference sessions busy {100 * busy:.0f} % of the chunks phase (mean of "
              f"{actors} actors; the rest waits for chunks, e.g. at the render's end)")  # fmt: skip
    if r.precision_prepare_s:
        print(f"{r.precision.get('precision')} generator quantised and gated before the render "
              f"(once per model, avatar and settings; the render loads it from the cache): "
              f"{r.precision_prepare_s:.1f} s")  # fmt: skip
    if bare:
        print(f"ratio end-to-end / bare inference: {ratio:.3f}")
    if r.bare_reduced:
        best = max(b.fps for b in r.bare_reduced)
        print(f"end to end / bare {reduced} inference: {r.e2e_fps / best:.3f}")
    stages = ", ".join(f"{k} {v:.1f}" for k, v in r.stage_cpu_ms_per_frame.items())
    print(f"CPU ms/frame by stage: {stages}")
    print(f"frames generated: {r.frames_generated} of {r.frames}; precision: "
          f"{r.precision.get('precision', 'fp32')} {r.precision.get('gate') or ''}")  # fmt: skip
    print(
        f"CPU ms/frame of the whole process tree: {r.tree_cpu_ms_per_frame:.1f} ("
        + ", ".join(f"{k} {v:.1f}" for k, v in r.process_cpu_ms_per_frame.items())
        + ")"
    )
    if r.cpu_table:
        print_cpu_table(r.cpu_table)
    print(
        f"peak memory of the process tree: PSS {r.peak_pss_mb:.0f} MB, RSS {r.peak_rss_mb:.0f} MB"
    )
    for style, ref in r.references.items():
        print(f"reference script ({style}), whole process: {ref['fps']:.2f} FPS "
              f"({ref['wall_s']:.1f} s; {ref['cpu_ms_per_frame']:.1f} CPU ms/frame, peak RSS "
              f"{ref['peak_rss_mb']:.0f} MB)")  # fmt: skip
        print("  phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in ref["phases_s"].items()))
    if r.reference:
        style = r.reference["style"]
        print(f"lipsync-ray render vs the faster reference ({style}), same footage and "
              f"model: {r.speedup:.2f}x faster (its wall / the render's wall)")  # fmt: skip


def print_cpu_table(table: dict) -> None:
    """Where the whole tree's CPU went (``cpu_budget.CpuTable.to_dict()``): each kind of
    process, then its stages and "other/transport" indented, then the whole tree."""
    print(f"CPU of the whole process tree, by process and stage ({table['frames']} frames; "
          "start-up: to the chunks phase, steady: in it, after: join and shutdown):")  # fmt: skip
    print(f"  {'process / stage':<30} {'start-up s':>10} {'steady ms/frame':>15} "
          f"{'after s':>8} {'whole run ms/frame':>18}")  # fmt: skip
    for row in [*table["rows"], table["tree"]]:
        name = f"  {row['stage']}" if row["stage"] else row["process"]
        print(f"  {name:<30} {row['startup_s']:>10.2f} {row['steady_ms_per_frame']:>15.2f} "
              f"{row['after_s']:>8.2f} {row['total_ms_per_frame']:>18.2f}")  # fmt: skip
    if table["sampling_shortfall_s"] > 0.005:
        print(f"  (processes raised by {table['sampling_shortfall_s']:.2f} CPU s in all to "
              "cover the stages measured inside them: the monitor samples)")  # fmt: skip
