"""The pipeline-parallel parts of a generated program (a plan with a pp axis).

The model class keeps its shape (its blocks' class, its parameters under their state-dict
names), but instead of one forward it has one method per stage, `stage0(idx)` ->
activations, `stage1(x)` -> ..., and `loss(logits, targets)`: the last stage's forward
stops where the loss begins (the nodes that read the targets), and the loss runs as the
schedule's `loss_fn`. Each rank keeps only its stage's parameters
(`rt.keep_stage_params`), wraps its method in a `PipelineStage` and trains with PyTorch's
`ScheduleGPipe` / `Schedule1F1B`; under MPI, `rt.MpiStage` and `rt.MpiSchedule` run the same
orders with nonblocking send/recv (backends/runtime/pipeline.py).
"""
from __future__ import annotations

from autopar.compiler import sharding
from autopar.compiler.sharded import format_bytes
from autopar.compiler.stages import block_range, chunk_coord, owned_prefixes, stage_io, stage_traffic, tied, wire_bytes


def is_pipeline(s) -> bool:
    return bool(getattr(s.plan, "pipeline", None))


class PipelineParts:
    def __init__(self, e):
        self.e = e
        s = e.s
        self.pp = s.plan.pipeline
        self.axis = self.pp["axis"]
        self.ios = stage_io(s, self.pp["ranges"])
        self.tied = tied(self.ios, s)
        self.m = max(1, int(s.plan.microbatches or 1))
        self.v = int(self.pp.get("virtual", 1))        # model chunks per rank (interleaved: > 1)
        self.precision = e.opts.precision

    # ---- header and tables ----

    def header_lines(self) -> list[str]:
        s, pp = self.e.s, self.pp
        names = self.e.top_names if hasattr(self.e, "top_names") else {}
        p = pp["stages"]
        if self.v > 1:
            lines = [f"pipeline: {p} stages over {self.axis}, schedule interleaved 1F1B, {self.v} model chunks "
                     f"per rank (chunk j on {self.axis} coordinate j mod {p}), {self.m} microbatches per step"]
        else:
            lines = [f"pipeline: {p} stages over {self.axis} (a rank runs the stage at its {self.axis} "
                     f"coordinate), schedule {pp['schedule']}, {self.m} microbatches per step"]
        times = pp.get("stage_time") or []
        for io in self.ios:
            st = io.stage
            blocks = block_range(pp["blocks"], st.blocks)
            if st.index in pp.get("pinned", []):
                blocks += " (pinned by the plan file)"
            on = f" (on {self.axis}={chunk_coord(st.index, p)})" if self.v > 1 else ""
            lines.append(f"  {'chunk' if self.v > 1 else 'stage'} {st.index}{on}: {blocks}; owns {', '.join(st.modules)}"
                         + (f" (predicted {times[st.index] * 1e3:.3g} ms fwd+bwd per step)"
                            if self.v == 1 and len(times) > st.index else ""))
            if io.outs and st.index + 1 < len(self.ios):
                lines.append(f"    sends {', '.join(names.get(v, v.name) for v in io.outs)} to stage "
                             f"{st.index + 1}: {self.mb_bytes(io.outs)} per microbatch forward, its gradient back")
        for name, st in self.tied.items():
            lines.append(f"  tied weight {name} on stages {', '.join(map(str, st))}: its gradient is "
                         f"all_reduced over them after backward")
        if self.v > 1:
            bubble = (p - 1) / (self.v * self.m)
            lines.append(f"  bubble (p-1)/(v m) = {bubble:.3g} of the step's compute idle on each stage")
        else:
            bubble = (p - 1) / self.m
            lines.append(f"  bubble (p-1)/m = {bubble:.3g} of the step's compute idle on each stage")
        return lines

    def tables(self) -> None:
        w, s = self.e.w, self.e.s
        w()
        if self.v > 1:
            w(f"# Pipeline: model chunk k runs on the ranks at {self.axis} coordinate `coord` (k mod "
              f"{self.pp['stages']}, {self.v} chunks per")
            w("# rank); `forward` names its method of the model class, `owns` the module prefixes of the")
            w("# parameters it keeps.")
        else:
            w(f"# Pipeline: stage k runs on the ranks at {self.axis} coordinate k; `forward` names its")
            w("# method of the model class, `owns` the module prefixes of the parameters it keeps.")
        w(f"PIPELINE = {{'axis': {self.axis!r}, 'schedule': {self.pp['schedule']!r}, "
          f"'microbatches': {self.m}}}")
        w("STAGES = [")
        for io in self.ios:
            owns = owned_prefixes(s, io, self.pp["blocks"])
            w(f"    {{'forward': 'stage{io.stage.index}', 'coord': {chunk_coord(io.stage.index, self.pp['stages'])}, "
              f"'blocks': {tuple(io.stage.blocks)!r}, 'owns': [", 0)
            for o in owns:
                w(f"        {o!r},", 0)
            w("    ]},", 0)
        w("]")
        w(f"# trainable weights several stages hold (a tied embedding and head) -> their {self.axis} coordinates")
        w(f"TIED = {self.tied!r}")

    # ---- the stage methods ----

    def methods(self) -> None:
        e = self.e
        p = len(self.ios)
        for io in self.ios:
            k = io.stage.index
            what = ("the batch's inputs" if k == 0 else f"stage {k - 1}'s activations")
            to = (f"what stage {k + 1} reads (sent to it)" if k + 1 < p else "what the loss reads")
            recv = send = None
            if k > 0:
                recv = (f"received from stage {k - 1} (recv over {self.axis}, "
                        f"{self.mb_bytes(io.args)} per microbatch); its gradient is sent back in backward")
            if k + 1 < p:
                send = (f"the schedule sends this to stage {k + 1} (send over {self.axis}, "
                        f"{self.mb_bytes(io.outs)} per microbatch) and receives its gradient in backward")
            self.method(f"stage{k}", io.forward_nodes, io.args, io.outs,
                        f"Stage {k} of {p}: {what} -> {to}.\nShapes below are the whole "
                        f"batch's; each call runs one of the {self.m} microbatches.", recv, send)
        last = self.ios[-1]
        self.method("loss", last.loss_nodes, [*last.outs, last.target], [e.s.outputs[0]],
                    "The schedule's loss_fn on the last stage: this microbatch's mean loss.")

    def mb_bytes(self, values) -> str:
        from autopar.compiler.stages import microbatch_bytes
        return format_bytes(sum(wire_bytes(microbatch_bytes(self.e.s, v, self.m), v.dtype, self.precision)
                                for v in values))

    def method(self, name, idx, args, outs, doc, recv=None, send=None) -> None:
        e = self.e
        s, w = e.s, e.w
        nodes = s.nodes
        mine = set(idx)
        order = [i for i in e.order if i in mine]
        names = e.top_names
        in_class = {}
        for c in e.classes:
            for inst in c.instances:
                for i in inst.core + inst.entries:
                    if i in mine:
                        in_class[i] = inst.path
        w(f"def {name}(self, {', '.join(names[v] for v in args)}):", 1)
        doc_lines = doc.split("\n")
        if len(doc_lines) == 1:
            w(f'"""{doc}"""', 2)
        else:
            w(f'"""{doc_lines[0]}', 2)
            for line in doc_lines[1:-1]:
                w(line, 2)
            w(f'{doc_lines[-1]}"""', 2)
        w("mesh = self.mesh", 2)
        for v in args:
            w(f"# {names[v]}: {e_shape(s, v)}" + (f", {recv}" if recv else ""), 2)
        top = [nodes[i] for i in order if i not in in_class]
        lines, known = e.sizes.block_lines(list(args), names, e.sizes.used(top))
        for line in lines:
            w(line, 2)
        e.known_sizes = known
        pending: list[int] = []
        emitted: set[str] = set()

        def later_uses(pend):
            ps = set(pend)
            defined = {v for i in pend for v in nodes[i].outputs}
            rest = [nodes[i] for i in order if i not in ps]
            return [v for v in defined if v in outs or any(v in n.inputs for n in rest)]

        def flush():
            if pending:
                from autopar.backends.codegen import attr_path, core_regions
                e.body([nodes[i] for i in pending], names, 2, lambda v: attr_path(v.name, e.tree),
                       core_regions(s, pending), outputs=later_uses(pending))
                pending.clear()
        for i in order:
            path = in_class.get(i)
            if path is None:
                pending.append(i)
                continue
            if path in emitted:
                continue
            flush()
            c, inst = e.instance[path]
            run = []
            for r in e.run_from(c, inst):
                if not (set(r.core) <= mine):
                    break
                run.append(r)
            e.emit_run(c, run, names)
            emitted.update(r.path for r in run)
        flush()
        if send:
            w(f"# {send}", 2)
        w(f"return {', '.join(names[v] for v in outs)}", 2)
        w()
        e.known_sizes = None

    # ---- main ----

    def main(self, w, s, backend, cls, opts, names, helpers) -> None:
        emit_checkpoint_args, emit_checkpoint_resume, emit_masters = helpers
        mesh, axis = s.mesh, self.axis
        loss = s.outputs[0]
        partial = [a for a, p in zip(mesh, s.layouts[loss.name]) if p == "P"]
        first_args = ", ".join(names[v] for v in self.ios[0].args)
        target = names[self.ios[-1].target]
        w("def main():")
        w("parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])", 1)
        w(f'parser.add_argument("--init", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), {opts.init_file!r}),', 1)
        w('help="the full state dict and the example batch (safetensors, rt.save_init)")', 5)
        w(f'parser.add_argument("--steps", type=int, default={opts.steps})', 1)
        w(f'parser.add_argument("--optimizer", choices=["sgd", "adamw"], default={opts.optimizer!r})', 1)
        w(f'parser.add_argument("--lr", type=float, default={opts.lr!r})', 1)
        w(f'parser.add_argument("--device", choices=["cpu", "cuda"], default={opts.device!r})', 1)
        w('parser.add_argument("--save", default="shards", help="directory for each rank\'s final shards")', 1)
        w('parser.add_argument("--stats", default=None, help="write losses, bytes and times to STATS.rank<r>.json")', 1)
        w('parser.add_argument("--microbatches", type=int, default=PIPELINE["microbatches"], '
          'help="microbatches per step (each rank\'s batch must divide by it)")', 1)
        choices = '["interleaved"]' if self.v > 1 else '["gpipe", "1f1b"]'
        w(f'parser.add_argument("--schedule", choices={choices}, default=PIPELINE["schedule"])', 1)
        w('parser.add_argument("--timeline", default=None, help="write the last step\'s trace and hidden communication to DIR")', 1)
        emit_checkpoint_args(w, s)
        w("args = parser.parse_args()", 1)
        w()
        w("rt.one_thread()", 1)
        w(f'mesh = rt.init_mesh(MESH, backend="{backend.runtime}", device=args.device)', 1)
        w("full, example = rt.load_init(args.init)  # safetensors: nothing is unpickled", 1)
        w(f'stage = mesh.coord("{axis}")  # this rank runs pipeline stage `stage`', 1)
        w('chunks = [c for c in STAGES if c["coord"] == stage]  # its model chunks, in order', 1)
        w(f"model = {cls}(mesh)", 1)
        w('elsewhere = rt.keep_stage_params(model, [o for c in chunks for o in c["owns"]])  # drop the other ranks\' parameters', 1)
        w("model.load_full_state_dict(full)", 1)
        w("model.to(mesh.device)", 1)
        inputs = ", ".join(names[v] for v in s.inputs)
        w(f"{inputs}{',' if len(s.inputs) == 1 else ''} = [shard(t, name, mesh).to(mesh.device)", 1)
        w(f"{' ' * (len(inputs) + 4)}for name, t in zip(INPUTS, example)]", 1)
        bf16 = self.precision == "bf16"
        if bf16:            # this stage's masters: of the parameters it kept
            emit_masters(w, inputs, s, "")
        w(f'assert {names[s.inputs[0]]}.shape[0] % args.microbatches == 0, '
          f'f"this rank\'s batch of {{{names[s.inputs[0]]}.shape[0]}} does not split into {{args.microbatches}} microbatches"', 1)
        w()
        buckets = s.overlap is not None and bool(s.overlap.buckets)
        if buckets:
            w("# this stage's replicated parameters' gradients: accumulated over the microbatches, then", 1)
            w("# all_reduced in buckets (GRAD_ORDER kept to the parameters this stage holds)", 1)
            w("model.grad_buckets = rt.GradBuckets(mesh, rt.stage_grad_order(GRAD_ORDER, model), model,", 1)
            w("                                    BUCKET_BYTES, FIRST_BUCKET_BYTES)", 1)
        w("trainable = masters.params()  # fp32" if bf16 else "trainable = [p for p in model.parameters() if p.requires_grad]", 1)
        w('if args.optimizer == "adamw":', 1)
        w("optimizer = torch.optim.AdamW(trainable, lr=args.lr, fused=True)  # one pass over each tensor's state", 2)
        w("else:", 1)
        w("optimizer = torch.optim.SGD(trainable, lr=args.lr, momentum=0.9)", 2)
        w("# a checkpoint holds each tensor once: this stage writes its own, a tied weight's first stage", 1)
        w("# writes it; a resume reads this stage's tensors (`elsewhere`: the other stages'), resharded", 1)
        w("# from any plan", 1)
        emit_checkpoint_resume(w, opts, False, f'rt.stage_specs(checkpoint_specs(model, full), "{axis}", stage, TIED)',
                               ", elsewhere=elsewhere" + (", masters=masters" if bf16 else ""))
        w()
        if backend.runtime == "mpi":
            w("# the pipeline over MPI: this rank's stage method in an rt.MpiStage; the schedule splits the", 1)
            w("# batch into microbatches, runs their forwards and backwards in GPipe or 1F1B order, sends", 1)
            w("# each microbatch's activations to the next stage (Isend/Irecv over pp, forward) and their", 1)
            w("# gradients back (backward), runs `model.loss` on the last stage and divides the", 1)
            w("# accumulated gradients by the microbatch count", 1)
        else:
            w("# PyTorch's pipeline: this rank's stage method in a PipelineStage; the schedule splits the", 1)
            w("# batch into microbatches, sends each microbatch's activations to the next stage (send/recv", 1)
            w("# over pp, forward) and their gradients back (backward), runs `model.loss` on the last", 1)
            w("# stage and divides the accumulated gradients by the microbatch count (scale_grads)", 1)
        if self.v > 1:
            w("# interleaved: one stage object per model chunk this rank runs (chunk k is stage k of", 1)
            w(f"# {len(self.ios)}); the schedule alternates between them, chunk by chunk", 1)
            w(f'pipe = rt.PipelineStageOf(model, [c["forward"] for c in chunks], mesh, "{axis}")', 1)
        else:
            w(f'pipe = rt.PipelineStageOf(model, chunks[0]["forward"], mesh, "{axis}")', 1)
        w("schedule = rt.pipeline_schedule(args.schedule, pipe, args.microbatches, loss_fn=model.loss)", 1)
        w(f'tied = rt.tied_groups(mesh, "{axis}", TIED)  # the ranks of each tied weight\'s stages', 1)
        w(f'first, last = stage == 0, stage == mesh.size("{axis}") - 1', 1)
        w()
        w("losses, traffic, calls, times = [], [], [], []", 1)
        w("timeline = rt.Timeline(mesh, args.timeline, args.steps)  # --timeline DIR: the last step, profiled", 1)
        w("for step in range(start, start + args.steps):", 1)
        w("mesh.reset_traffic()", 2)
        w("timeline.begin(step)", 2)
        w("t0 = time.perf_counter()", 2)
        w("microbatch_losses = []", 2)
        w(f"# the first stage is fed the batch ({first_args}), the last stage the targets ({target})", 2)
        ind = 2
        if buckets:
            w("with model.grad_buckets.no_sync():  # the gradients stay local through the microbatches", 2)
            ind = 3
        w(f"schedule.step(*(({first_args},) if first else ()), target={target} if last else None,", ind)
        w("              losses=microbatch_losses if last else None)", ind)
        if buckets:
            w("rt.reduce_grad_buckets(model.grad_buckets)  # then each bucket once, after the last microbatch", 2)
        w(f'rt.reduce_tied_grads(model, mesh, "{axis}", TIED, tied)  # all_reduce over the stages holding it', 2)
        if bf16:
            w("masters.grads_to_masters()  # bf16 gradients (already reduced) widened onto the fp32 masters", 2)
        w("optimizer.step()", 2)
        w("optimizer.zero_grad(set_to_none=True)", 2)
        if bf16:
            w("masters.refresh()  # bf16 weights rounded from the stepped masters", 2)
        w("times.append(time.perf_counter() - t0)", 2)
        w("timeline.end(step)", 2)
        w("# the step's loss: the mean of the microbatches' means, from the last stage to every stage", 2)
        red = "(sum(x.item() for x in microbatch_losses) / len(microbatch_losses) if last else 0.0)"
        for a in partial:
            red = f'mesh.all_reduce_scalar({red}, "{a}")'
        w(f'losses.append(mesh.all_reduce_scalar({red}, "{axis}"))', 2)
        w('traffic.append({f"{kind}:{axis}": b for (kind, axis), b in sorted(mesh.traffic.items())})', 2)
        w('calls.append(collections.Counter(f"{e.kind}:{e.axis}" for e in mesh.events))', 2)
        w('rt.log(mesh, f"step {step}: loss {losses[-1]:.6f} ({times[-1] * 1e3:.1f} ms)")', 2)
        w("ckpt.step_done(step + 1)  # saves every --every steps", 2)
        w("ckpt.finish(start + args.steps)  # the last save; waits for background writers", 1)
        w()
        w("timeline.write()", 1)
        w("peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # training's peak: before the final save", 1)
        w("os.makedirs(args.save, exist_ok=True)", 1)
        if bf16:
            w('rt.save_file(os.path.join(args.save, f"rank{mesh.rank}.safetensors"), masters.state_dict())  # the fp32 masters', 1)
        else:
            w('rt.save_file(os.path.join(args.save, f"rank{mesh.rank}.safetensors"), model.state_dict())', 1)
        w("if args.stats:", 1)
        w('with open(f"{args.stats}.rank{mesh.rank}.json", "w") as f:', 2)
        w('json.dump({"rank": mesh.rank, "coords": mesh.coords, "losses": losses, "traffic": traffic, "calls": calls,', 3)
        w('"times": times, "max_rss_kib": peak_kib,', 5)
        w('"checkpoint": ckpt.stats()}, f)', 5)
        w("mesh.shutdown()", 1)
        w()
        w()
        w('if __name__ == "__main__":')
        w("main()", 1)


def e_shape(s, v) -> str:
    from autopar.backends.codegen import shape_comment
    return shape_comment(s, v)


def predicted_stage_traffic(s, precision: str = "fp32") -> list[dict[str, int]]:
    """Bytes per step and rank of each stage: its own collectives (the plan's, of the nodes
    it runs) and the pipeline's send / recv / tied all_reduce, in `precision`."""
    ios = stage_io(s, s.plan.pipeline["ranges"])
    out = []
    for extra in stage_traffic(s, ios, precision):
        total: dict[str, int] = {}
        for k, b in extra:
            total[k] = total.get(k, 0) + b
        out.append(dict(sorted(total.items())))
    return out


def predicted_stage_calls(s) -> list[dict[str, int]]:
    ios = stage_io(s, s.plan.pipeline["ranges"])
    out = []
    for extra in stage_traffic(s, ios):
        total: dict[str, int] = {}
        for k, _ in extra:
            total[k] = total.get(k, 0) + 1
        out.append(dict(sorted(total.items())))
    return out


def stage_traffic_table(s, stats: list[dict], table, precision: str = "fp32") -> tuple[bool, list[str]]:
    """`autopar run`'s bytes table, one per pipeline stage: the ranks of stage k (pp
    coordinate k) against stage k's prediction (`table`: run.traffic_table)."""
    axis = s.plan.pipeline["axis"]
    ok, lines = True, []
    for k, (want, calls) in enumerate(zip(predicted_stage_traffic(s, precision), predicted_stage_calls(s))):
        mine = [st for st in stats if st["coords"][axis] == k]
        same, part = table(want, {}, mine, calls)
        ok &= same
        lines.append(f"stage {k} ({axis}={k}, ranks {', '.join(str(st['rank']) for st in mine)}):")
        lines += ["  " + x for x in part]
    return ok, lines


__all__ = ["is_pipeline", "stage_traffic_table", "PipelineParts", "predicted_stage_traffic", "predicted_stage_calls"]
