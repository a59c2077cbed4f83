"""The run controller: an explicit state machine that drives a worker group to the end.

Owns: the driver loop — start the group, step it, validate, checkpoint, re-place experts,
and on a lost actor (or a lost node) rebuild the group on the nodes there are and resume from the
last committed checkpoint, within the failure policy; the run's topology (the rank -> node map
the group found) and re-solving the placement when a rebuilt group lands on another layout.
States: STARTING -> RUNNING <-> (CHECKPOINTING | REPLACING | RESIZING) -> FINISHED, and
RESTARTING -> STARTING after a failure, FAILED when the policy gives up. An elastic run starts on
what fits, grows and recovers a loss in place from memory (RESIZING: :mod:`cluster.inplace`)."""

from __future__ import annotations

import logging
import sys
import time
import uuid


from ray.exceptions import RayError

from cluster import checkpointing, elastic, inplace, recovery, replacement
from cluster.group import WorkerGroup, WorkerGroupError, WorkerGroupStartError
from cluster.runstate import TERMINAL, FailurePolicy, RunAborted, RunResult, State, run_summary
from cluster.stop import StopGuard, StopRequested
from cluster.telemetry import Telemetry
from moetrain.config import RunConfig, sized
from moetrain.train.checkpointer import ResumePoint
from moetrain.train.metrics import StepMetrics
from moetrain.train.stats import merge_rank_samples
from moetrain.train.summary import format_summary, step_line
from moetrain.train.trainer import initial_placement
from placement.placement import Placement

log = logging.getLogger("moetrain")


# Placing a group that fits takes well under a second: a rebuild after a node loss waits at least
# this long for its placement group even with cluster.node_wait_s=0.
MIN_REPLACE_WAIT_S = 5.0


class Controller:
    _growth: inplace.Growth | None

    def __init__(self, cfg: RunConfig, *, on_step=None, memory_plan: dict | None = None, lease=None):
        self.cfg = cfg
        self.memory_plan = memory_plan  # moetrain.plan's per-rank figures, kept in summary.json
        self.state = State.STARTING
        self.policy = FailurePolicy(cfg.cluster.max_failures)
        self.placement: Placement = initial_placement(cfg)
        self.group: WorkerGroup | None = None
        self.resume: ResumePoint | None = checkpointing.resolve_resume(cfg)
        self.step = 0
        self.history: list[StepMetrics] = []
        self.replacements: list[replacement.Decision] = []
        self.checkpoints: list[str] = []
        self.val_start: dict = {}
        self.val_last: dict = {}
        self.telemetry = Telemetry(cfg)
        # One lineage id for the run: a resumed run continues the lineage it resumes.
        self.run_id = self.resume.run_id if self.resume and self.resume.run_id else uuid.uuid4().hex[:12]
        self.ckpt = checkpointing.Coordinator(cfg, self.telemetry, run_id=self.run_id, lease=lease)
        self.replanner = replacement.Replanner(cfg) if cfg.placement.replan_every > 0 else None
        self.on_step = on_step
        self._stop_requested = False
        self.nonfinite_skips = 0
        self._slowest_step_s = 0.0  # driver-side wall time of the slowest step so far
        self.restarts = 0
        self.error = ""
        self.user_error = False
        self.node_of_rank: tuple[int, ...] = ()  # the current group's layout (its topology)
        self.layouts: list[tuple[int, ...]] = []  # every group's layout, in order
        self.resolved_for_topology = 0  # placements re-solved because a rebuilt group landed elsewhere
        self._t_start = 0.0
        self.size = elastic.Elastic(cfg, self.telemetry)
        self._redo, self._growth = 0, None  # steps a restart redoes; actors starting to grow
        self._bar = None
        if cfg.logging.progress and sys.stderr.isatty():  # a bar for people; log lines for logs
            from tqdm import tqdm

            self._bar = tqdm(total=cfg.train.steps, desc=cfg.cluster.run_name, unit="step", leave=False)

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> None:
        """Finish the current step, then stop (with a final checkpoint when checkpoints are on)."""
        self._stop_requested = True

    # ---- state handlers ------------------------------------------------------------------------
    def _set(self, state: State) -> None:
        if state != self.state:
            log.info("run %s: %s -> %s", self.cfg.cluster.run_name, self.state.value, state.value)
        self.state = state
        self.telemetry.state(state.value)

    def _starting(self) -> State:
        r = self.resume
        rebuild = self.restarts > 0  # after a loss: wait for capacity (nodes may be coming back)
        c = self.cfg.cluster
        before, old, t0 = self.size.world, self.placement, time.perf_counter()
        self.size.choose_start(max(c.node_wait_s, MIN_REPLACE_WAIT_S) if rebuild else c.start_timeout_s)
        if r and r.placement.num_ranks == self.size.world and self.cfg.placement.initial == "contiguous":
            # Same group size and no placement asked for: continue on the saved placement
            # (bit-exact continuation). Otherwise the configured placement; every rank loads
            # exactly the experts it hosts from the per-expert objects.
            self.placement = r.placement
        self.group = WorkerGroup.create(
            self.size.cfg_now(),
            self._placement_for,
            resume=r,
            place_wait_s=max(c.node_wait_s, MIN_REPLACE_WAIT_S) if rebuild else None,
            place_what="cluster.node_wait_s" if rebuild else "cluster.start_timeout_s",
        )
        self._log_layout()
        # The run's actor names are ours now (no other live run of this name): what an earlier
        # crash of this run left half-written can go. No checkpoint of ours is in flight here.
        self._remove_partial_checkpoints()
        if r:
            self.step = r.step
            log.info("resumed from %s at step %d", r.uri, self.step)
        if rebuild and self.size.enabled:  # (no checkpoint: from step 0, every step redone)
            src = r.uri if r else "step 0 (no committed checkpoint)"
            self.size.record("node lost", self.step, before, src, (old, self.placement), t0, self._redo)
            self.size.refused = ""
        if not self.val_start:
            self.val_start = self.group.call("evaluate")[0]
        return State.RUNNING

    def _running(self) -> State:
        t = self.cfg.train
        if self.step >= t.steps:
            return State.FINISHED
        if self._stop_requested:
            return State.STOPPED
        if self._grow_ready():
            return State.RESIZING
        self._check_checkpoints()
        t0 = time.monotonic()
        m: StepMetrics = self._live_group().call(
            "train_step",
            stuck_after_s=self._step_deadline(),
            keep_survivors=self.size.enabled,  # a recovery from memory (or the reason there is none)
        )[0]
        self._slowest_step_s = max(self._slowest_step_s, time.monotonic() - t0)
        self.step = m.step
        self.history.append(m)
        self._check_finite(m)
        self.telemetry.step(m)
        if self._bar is not None:
            self._bar.update(self.step - self._bar.n)
            self._bar.set_postfix(loss=f"{m.loss:.3f}", tok_s=f"{m.tokens_per_s:,.0f}")
        if self.on_step:
            self.on_step(m)
        if self.step % t.log_every == 0 or self.step == 1:
            log.info(step_line(m))
        if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
            self.val_last = self._live_group().call("evaluate")[0]
            self.telemetry.validation(self.step, self.val_last)
            log.info("step %d validation %s", self.step, _fmt(self.val_last))
        if self.replanner:
            if self.replanner.ready():
                return State.REPLACING  # a finished solve is applied at this step boundary
            if replacement.due(self.cfg, self.step):
                self.replanner.launch(self.group, self.placement, self.step)  # solves off the critical path
                if self.cfg.placement.blocking and self.replanner.ready(block=True):
                    return State.REPLACING
        if checkpointing.due(self.cfg, self.step):
            return State.CHECKPOINTING
        return State.RUNNING

    def _placement_for(self, node_of_rank: tuple[int, ...]) -> Placement:
        """The placement to start on, once the group is placed on ``node_of_rank`` (before any
        actor starts). A rebuilt group on another layout than the last one gets its placement
        re-solved for the new topology from the routing statistics of the last re-plan (the
        current one when there are none: every placement trains the same model)."""
        previous, self.node_of_rank = self.node_of_rank, tuple(node_of_rank)
        self.layouts.append(self.node_of_rank)
        stats = self.replanner.last_stats if self.replanner else None
        if self.placement.num_ranks != len(node_of_rank):  # an elastic run changed its size
            self.placement = elastic.placement_of_size(self.size.cfg_now())
        if previous and previous != self.node_of_rank and stats is not None:
            p = self.cfg.placement
            topo = replacement.run_topology(self.cfg, self.placement, self.node_of_rank)
            prop = replacement.solve_now(stats, topo, self.placement, self.cfg)
            log.info(
                "the group landed on a new layout (ranks per node %s -> %s): placement re-solved for it "
                "(predicted cost %.3f -> %.3f, %s, %.1f s)",
                _per_node(previous),
                _per_node(self.node_of_rank),
                prop.cost_before,
                prop.cost_after,
                p.method,
                prop.solve_time_s,
            )
            self.placement = prop.placement
            self.resolved_for_topology += 1
        self.placement = replacement.honour_fault_domains(self.cfg, self.placement, self.node_of_rank, "placement")
        return self.placement

    def _log_layout(self) -> None:
        log.info("run %s: %s", self.cfg.cluster.run_name, self._live_group().describe_layout(self.node_of_rank))

    def _live_group(self) -> WorkerGroup:
        """The group, in the states that have one (running, checkpointing, re-placing, finishing)."""
        if self.group is None:
            raise RuntimeError(f"run {self.cfg.cluster.run_name}: no worker group in this state")
        return self.group

    def _step_deadline(self) -> float:
        """Watchdog bound for the next step: the slowest step seen so far plus
        ``cluster.step_timeout_s``; before any step, the group's start budget plus that."""
        c = self.cfg.cluster
        return (self._slowest_step_s or c.start_timeout_s) + c.step_timeout_s

    def _check_finite(self, m: StepMetrics) -> None:
        if not m.skipped:
            return
        self.nonfinite_skips += 1
        what = ", ".join(f"{q}={getattr(m, q)}" for q in m.nonfinite)
        limit = self.cfg.train.max_nonfinite_skips
        if self.nonfinite_skips > limit:
            raise RunAborted(
                f"step {m.step}: non-finite {what}; the update was not applied and the run stops "
                f"(train.max_nonfinite_skips={limit}; the last committed checkpoint is intact)"
            )
        log.warning(
            "step %d: non-finite %s: update skipped (%d of at most %d)", m.step, what, self.nonfinite_skips, limit
        )

    def _check_checkpoints(self) -> None:
        limit = self.cfg.checkpoint.max_consecutive_failures
        if limit and self.ckpt.consecutive_failures >= limit:
            step, msg = self.ckpt.failed[-1]
            raise RunAborted(
                f"{self.ckpt.consecutive_failures} checkpoints failed in a row (last: step {step}: "
                f"{msg}); checkpoint.max_consecutive_failures={limit}"
            )

    def _grow_ready(self) -> bool:
        """Start joiners (in the background) when room appears; True once all are up (RESIZING)."""
        g, group = self._growth, self._live_group()
        if g is None:
            if self.size.grow_due(lambda bad: len(inplace.spare_bundles(group, bad))):
                n = self.size.grow_to
                self._growth = inplace.Growth.start(group, sized(self.cfg, n), n, self.step, self.size.suspects)
            return False
        try:
            if not g.ready():
                return False
            log.info("run %s: %d actor(s) up: joining at step %d", self.cfg.cluster.run_name, len(g.members), self.step)
            return True
        except RayError as exc:
            log.warning("run %s: an actor was lost before it joined (%s)", self.cfg.cluster.run_name, exc)
            self._drop_growth()
            return False

    def _drop_growth(self) -> None:
        g, self._growth = self._growth, None
        if g is not None:
            g.cancel()

    def _resizing(self) -> State:
        """Grow at this step boundary, in place: this step's state goes to the object store, the
        group and the actors that joined form a new process group and load it; no step is redone."""
        g, self._growth = self._growth, None
        assert g is not None  # RESIZING follows _grow_ready
        group, before, old, t0 = self._live_group(), self.size.world, self.placement, time.perf_counter()
        self.ckpt.wait()  # a commit in flight reads the old group's uploads
        state = elastic.snapshot(group, self.step, self.placement, self.run_id)
        self.size.world = g.size
        members = inplace.members_of(group, list(range(before))) + g.members
        try:
            self.group = inplace.regroup(group, members, self.size.cfg_now(), self._placement_for, state, g.gangs)
        except WorkerGroupError as exc:
            self.size.world, self.placement = before, old
            g.cancel()
            if not isinstance(exc, WorkerGroupStartError):  # a rank lost while joining: the checkpoint path
                raise
            log.warning("run %s: not growing: %s", self.cfg.cluster.run_name, exc)  # the layout breaks ranks_per_node
            return State.RUNNING
        if self.replanner:  # a solve for the old size does not apply
            self.replanner = replacement.Replanner(self.cfg, last_stats=self.replanner.last_stats)
        self._log_layout()
        self.size.record("grow", self.step, before, state.uri, (old, self.placement), t0, 0, state.nbytes)
        return State.RUNNING

    def _replacing(self) -> State:
        assert self.replanner is not None  # REPLACING follows a launch, which needs a replanner
        decision = self.replanner.finish(self.group, self.placement, self.step)
        self.replacements.append(decision)
        self.telemetry.replacement(decision)
        if decision.migrated:
            self.placement = decision.proposal.placement
        return State.CHECKPOINTING if checkpointing.due(self.cfg, self.step) else State.RUNNING

    def _checkpointing(self) -> State:
        self.ckpt.wait()  # the previous commit is decided: the failure count is exact here
        self._check_checkpoints()
        self.ckpt.start(self.group, self.step, self.placement)
        return State.RUNNING

    def _restarting(self, exc: BaseException) -> State:
        log.warning(
            "run %s lost a worker (attempt %d of %d):\n%s",
            self.cfg.cluster.run_name,
            self.policy.failures,
            self.policy.max_failures,
            exc,
        )
        if self.replanner:  # drop a solve for the lost group; keep the statistics it saw
            self.replanner = replacement.Replanner(self.cfg, last_stats=self.replanner.last_stats)
        self.ckpt.wait()
        self._drop_growth()  # joiners of the lost group: a recovered group looks for room anew
        survivors = getattr(exc, "survivors", None)
        if survivors and self._recover_from_memory(survivors):
            return State.RUNNING
        if self.group:
            self.group.shutdown(graceful=False)
        self.group = None
        self.resume = self.ckpt.latest()
        self._redo = self.step - (self.resume.step if self.resume else 0)  # completed steps to redo
        if self.resume is None:
            log.warning("no committed checkpoint yet: restarting from step 0")
            self.step = 0
        return State.STARTING

    def _recover_from_memory(self, survivors: list[int]) -> bool:
        """An elastic run that lost ranks: make the survivors agree on the cut step and re-form the
        group in place from them (:mod:`cluster.recovery`, :mod:`cluster.inplace`), on the largest
        allowed size they make. False (the old group left to the checkpoint path) when memory
        cannot give the state or the survivors cannot form a group."""
        group, before, old, t0 = self._live_group(), self.size.world, self.placement, time.perf_counter()
        self._set(State.RESIZING)
        try:
            state, decision = recovery.collect(group.actors, self.placement, survivors, self.run_id, self.cfg)
            keep = recovery.keep(self.cfg, list(decision.survivors), group.node_of_rank)
            WorkerGroup._kill([a for r, a in enumerate(group.actors) if r not in keep])  # (the lost too)
            self.size.world, members = len(keep), inplace.members_of(group, keep)
            self.group = inplace.regroup(group, members, self.size.cfg_now(), self._placement_for, state)
        except (recovery.NotRecoverable, RayError, WorkerGroupError) as exc:
            why = self.size.refused = str(exc).splitlines()[0][:300]
            log.warning(
                "run %s: no recovery from memory (%s): back to the last checkpoint", self.cfg.cluster.run_name, why
            )
            self.size.world, self.placement, self.group = before, old, group
            return False
        log.info(
            f"run {self.cfg.cluster.run_name}: ranks {list(decision.survivors)} survived; every survivor is at "
            f"the end of step {decision.step} ({recovery.describe(decision)}); ranks {keep} go on"
        )
        self._log_layout()
        self.step = decision.step
        self.size.suspect(gone := recovery.gone_nodes(group.rank_info, decision.survivors, keep))
        lost = [i["rank"] for i in group.rank_info if i["rank"] not in decision.survivors or i["node_id"] in gone]
        self.size.record("node lost", self.step, before, state.uri, (old, self.placement), t0, 0, state.nbytes, lost)
        return True

    # ---- the loop ---------------------------------------------------------------------------------
    def run(self) -> RunResult:
        self._t_start = time.perf_counter()
        aborted = False
        with StopGuard.install() as guard, guard.attach(self):
            try:
                summary = self._loop()
            except StopRequested as exc:  # a second signal: stop now, no final evaluation or checkpoint
                guard.caught()
                aborted, summary = True, {}
                self.error = f"{exc} during the stop: stopped at once, without a final evaluation or checkpoint"
                log.warning("run %s: %s", self.cfg.cluster.run_name, self.error)
                if self.state != State.FAILED:
                    self._set(State.STOPPED)
            except BaseException:  # a bug, or an on_step callback that raised: leave no actor behind
                self._drop_growth()
                if self.group:
                    self.group.shutdown(graceful=False)
                raise
        final_error = self.ckpt.step_failed(self.step) if self.state != State.FAILED and not aborted else ""
        if final_error:
            self._fail(f"the final checkpoint (step {self.step}) failed: {final_error}")
        if self.state == State.FAILED:
            self._remove_partial_checkpoints()
        summary = self._summary(summary)
        self.checkpoints = list(self.ckpt.committed)
        self._drop_growth()
        if self.group:
            self.group.shutdown(graceful=not aborted)
        self.telemetry.close(summary)
        return RunResult(
            self.state,
            summary,
            self.history,
            self.replacements,
            self.checkpoints,
            self.restarts,
            self.error,
            self.user_error,
        )

    def _loop(self) -> dict:
        """The state machine to a terminal state, then the final evaluation and checkpoint."""
        handlers = {
            State.STARTING: self._starting,
            State.RUNNING: self._running,
            State.REPLACING: self._replacing,
            State.CHECKPOINTING: self._checkpointing,
            State.RESIZING: self._resizing,
        }
        summary: dict = {}
        while True:
            while self.state not in TERMINAL:
                try:
                    self._set(handlers[self.state]())
                except WorkerGroupError as exc:
                    self._lost_worker(exc)
                except RunAborted as exc:
                    self._fail(str(exc))
            if self.state == State.FAILED:
                break
            try:
                summary = self._finish()
                self.ckpt.wait()  # a first signal here only sets the stop flag: the final commit completes
                lost = self.ckpt.lost_worker(self.step)
                if lost is not None:
                    raise lost
                break
            except WorkerGroupError as exc:
                # A node lost in the final evaluation or while the final checkpoint uploads is a
                # lost worker like any other (a FINISHED run restarts from the last commit and
                # redoes the tail); a STOPPED run was asked to end, so it ends, failed.
                if self.state == State.FINISHED:
                    self._lost_worker(exc)
                else:
                    self._fail(f"final evaluation / checkpoint: {exc}")
        if self._bar is not None:
            self._bar.close()
        self.ckpt.wait()
        return summary

    def _lost_worker(self, exc: WorkerGroupError) -> None:
        """RESTARTING while the failure budget lasts, else FAILED."""
        if self.policy.should_retry(exc):
            self.restarts += 1
            self._set(State.RESTARTING)
            self._set(self._restarting(exc))
        else:
            # a group the cluster cannot hold, before any training: bad input (exit 2)
            refused = getattr(exc, "unplaceable", False) and self.restarts == 0
            self._fail(str(exc), user_error=refused)

    def _remove_partial_checkpoints(self) -> None:
        try:
            checkpointing.remove_uncommitted(self.cfg)
        except Exception as exc:  # the store may be what failed: report, keep the run's own error
            log.warning("could not remove uncommitted checkpoint folders: %s", str(exc).splitlines()[0][:300])

    def _fail(self, error: str, user_error: bool = False) -> None:
        self.error, self.user_error = error, user_error
        log.error("run %s failed: %s", self.cfg.cluster.run_name, error)
        self._set(State.FAILED)

    def _finish(self) -> dict:
        """Final validation, final checkpoint, outputs (FINISHED and STOPPED runs)."""
        self.val_last = self._live_group().call("evaluate")[0]
        self.telemetry.validation(self.step, self.val_last)
        if self.cfg.checkpoint.uri and not (self.resume and self.resume.step == self.step):
            self.ckpt.start(self.group, self.step, self.placement)  # (a resume at the end: committed already)
        stats = merge_rank_samples(self._live_group().call("routing_stats"))
        self.replacements = replacement.measured_gains(self.replacements, self.history)
        run_hist = self.history
        tokens = sum(h.tokens for h in run_hist)
        train_time = sum(h.step_time_s for h in run_hist)
        outputs = self.telemetry.write_outputs(stats, self.placement, self.cfg)
        return {
            "tokens": tokens,
            "tokens_per_s": tokens / max(train_time, 1e-9),
            "first_loss": run_hist[0].loss if run_hist else float("nan"),
            "last_loss": run_hist[-1].loss if run_hist else float("nan"),
            "val_start": self.val_start,
            "val_loss": self.val_last,
            "load_LE": stats.load_LE.tolist(),
            "outputs": outputs,
            "replacements": [d.to_dict() for d in self.replacements],
        }

    def _summary(self, results: dict) -> dict:
        """summary.json for every terminal state: how the run ended, and its results if any."""
        summary = run_summary(self, time.perf_counter() - self._t_start, results)
        if results:
            log.info(format_summary(summary))
        return summary


def _per_node(node_of_rank: tuple[int, ...]) -> str:
    return "+".join(str(node_of_rank.count(n)) for n in range(max(node_of_rank) + 1))


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v:.4f}" for k, v in d.items())
