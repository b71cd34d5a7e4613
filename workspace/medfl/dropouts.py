"""Which envoys an experiment goes on without, and when it fails: the director's rules, mixed into the experiment's
aggregator (medfl.aggregator.SelectingAggregator).

OpenFL waits forever for an envoy that has gone. Here an envoy is dropped from the experiment when the director stops
hearing from it, when it registers again after a restart (its state in the experiment is gone), when it has not
finished a round `round_timeout` seconds after the round began, or when its own policy refused the experiment. The
round then ends with the envoys that remain, if at least `min_envoys` do (a number, or a share of the experiment's
envoys: medfl.selection.quorum); otherwise the experiment fails, naming them. Both are streamed to the notebook as
events (DROPPED, FAILED) among the metrics. The director learns of lost, restarted and held envoys; it tells the
aggregator through the methods of openfl_adjustments.contract.EnvoyAwareAggregator (watch_envoys, drop, hold,
has_dropped, failure), which EnvoyRules implements.

When an envoy reports an error, OpenFL stops the aggregator and, on paper, every collaborator, whose envoys then
retry forever against an aggregator that has gone. Here the director drops that envoy, naming its error
(openfl_adjustments.faults), and the run goes on while `min_envoys` remain; an aggregator that stops keeps running
until each remaining collaborator has been told to quit (or has been lost).
"""
from __future__ import annotations

import threading
import time

from .events import AGGREGATED, DROPPED, FAILED, HELD, REFUSED
from .selection import quorum


class EnvoyRules:
    """Dropping envoys and failing the experiment. Needs of the aggregator: OpenFL's Aggregator (its lock, round,
    collaborators and quit bookkeeping) and its metric_queue."""

    def _start_rules(self, min_envoys, round_timeout: float) -> None:
        self.min_envoys, self.round_timeout = min_envoys, float(round_timeout or 0)
        self.dropped: dict[str, str] = {}  # envoy: why
        self._failure = None  # why the experiment stopped, if it did so here
        self.stopped = False
        self._silent = None  # see watch_envoys
        self._round_started: dict[int, float] = {}
        self._held: set[str] = set()  # envoys waiting for their operator's approval: round_timeout waits for them

    def _start_watching(self) -> None:
        threading.Thread(target=self._watch, name="envoy-watch", daemon=True).start()

    # --- tasks: a dropped envoy gets no more work -------------------------------------------------------------
    def get_tasks(self, collaborator_name):
        if collaborator_name in self.dropped:
            self.quit_job_sent_to.append(collaborator_name)
            return None, self.round_number, 0, True
        self._held.discard(collaborator_name)  # approved: it runs
        tasks, round_number, sleep_time, time_to_quit = super().get_tasks(collaborator_name)
        if tasks:
            self._round_started.setdefault(round_number, time.monotonic())
        return tasks, round_number, sleep_time, time_to_quit

    def _end_of_round_with_stragglers_check(self) -> None:
        # Called under self.lock after each envoy's results, and by the watcher after a drop.
        remaining = self._remaining()
        if remaining and all(c in self.collaborators_done for c in remaining):
            self._end_of_round_check()

    def _remaining(self) -> list[str]:
        return [c for c in self.authorized_cols if c not in self.dropped]

    # --- the watcher ------------------------------------------------------------------------------------
    def _watch(self, period: float = 0.5) -> None:
        while not self.all_quit_jobs_sent():
            time.sleep(period)
            with self.lock:
                self.check_envoys()

    # --- the director's side of openfl_adjustments.contract.EnvoyAwareAggregator ---------------------------
    def watch_envoys(self, silent) -> None:
        """Drop, from now on, the envoys that silent() names: {envoy: seconds since the director heard it}."""
        self._silent = silent

    def has_dropped(self, name: str) -> bool:
        """True if envoy `name` left this experiment."""
        return name in self.dropped

    def failure(self) -> str | None:
        """Why this aggregator stopped the experiment, or None."""
        return self._failure

    def hold(self, name: str, why: str) -> None:
        """Envoy `name` waits for its operator to approve the experiment's code: the notebook is told `why`, and
        round_timeout does not count for it until it asks for its first task (it refuses, if not approved)."""
        with self.lock:
            if name in self.authorized_cols and name not in self.dropped:
                self._held.add(name)
                self.metric_queue.put(self._event(name, HELD, why))

    def drop(self, name: str, why: str) -> None:
        """Drop envoy `name` now, for a reason the director knows (it registered again after a restart)."""
        with self.lock:
            if name in self.authorized_cols and name not in self.dropped:
                self._drop(name, why)
                self._judge()  # not check_envoys: dropping the last envoys makes every quit "sent"

    def check_envoys(self) -> None:
        """Drop the envoys the director lost and, past round_timeout, those still busy; then end the
        round with the rest, or fail if too few remain. Called with self.lock held."""
        if self.all_quit_jobs_sent():
            return
        silent = self._silent() if self._silent else {}
        for name in self._remaining():
            if name in silent:
                self._drop(name, f"the director has not heard from it for {silent[name]:.0f} s")
        self._judge()

    def _judge(self) -> None:
        """While the experiment runs: drop envoys past round_timeout, then fail below min_envoys, or end the
        round with the envoys that remain."""
        if self._time_to_quit():  # stopped, or every round done: nothing left to cut short
            return
        started = self._round_started.get(self.round_number)
        if self.round_timeout and started and time.monotonic() - started > self.round_timeout:
            for name in self._remaining():
                if name not in self.collaborators_done and name not in self._held:
                    self._drop(name, f"it had not finished the round {self.round_timeout:g} s after it began "
                                     "(round_timeout)")
        needed = quorum(self.min_envoys, len(self.authorized_cols))
        remaining = self._remaining()
        if len(remaining) < needed:
            lost = "; ".join(why[len(REFUSED):] if why.startswith(REFUSED) else f"{name}: {why}"
                             for name, why in self.dropped.items())
            self._fail(f"only {len(remaining)} of {len(self.authorized_cols)} envoys remain, fewer than the {needed} "
                       f"that min_envoys={self.min_envoys!r} requires. Lost: {lost}")
        elif self.dropped:
            self._end_of_round_with_stragglers_check()

    def _drop(self, name: str, why: str, round_number: int | None = None) -> None:
        """Drop envoy `name`; the event names `round_number` (default: the current round)."""
        self.dropped[name] = why
        self.quit_job_sent_to.append(name)  # the experiment may end without its goodbye
        self.logger.warning("Dropped envoy %s in round %d: %s", name, self.round_number, why)
        if not self._time_to_quit():
            self.metric_queue.put(self._event(name, DROPPED, why, round_number))

    def _fail(self, why: str) -> None:
        self._failure = why
        self.logger.error("The experiment stops: %s", why)
        self.metric_queue.put(self._event(AGGREGATED, FAILED, why))
        self.stopped = True

    def _event(self, origin: str, kind: str, why: str, round_number: int | None = None) -> dict:
        r = self.round_number if round_number is None else round_number
        started = self._round_started.get(r)
        return {"round": r, "metric_origin": origin, "task_name": kind, "metric_name": why,
                "metric_value": time.monotonic() - started if started else 0.0}

    # --- stopping -----------------------------------------------------------------------------------------
    def stop(self, failed_collaborator: str = None) -> None:
        """Stop the experiment: the failed envoy is done with; every other one is told to quit when it next
        asks for tasks (OpenFL would mark them all as told at once, and stop answering them)."""
        self.logger.info("Stopping the experiment; the remaining envoys are told to quit as they ask for tasks.")
        if failed_collaborator:
            self.quit_job_sent_to.append(failed_collaborator)
            if not self.stopped:
                self._fail(f"{failed_collaborator} reported an error in its task; its envoy's log shows it")
        self.stopped = True

    def _time_to_quit(self) -> bool:
        return self.stopped or super()._time_to_quit()
