"""The controller's scheduler, one file per step of a segment's path.

- :mod:`farm.scheduling.runtime`: what is held in memory per job, segment and attempt;
- :mod:`farm.scheduling.queue`: the queue and its order (submit, steer, re-cut);
- :mod:`farm.scheduling.recovery`: taking over jobs whose owner stopped;
- :mod:`farm.scheduling.handout`: hand-out and pipelining;
- :mod:`farm.scheduling.outcomes`: outcomes, retries, timeouts and cancels;
- :mod:`farm.scheduling.assembly`: assembly and chaining.

:class:`farm.scheduler.Scheduler` puts them together and runs the rounds.
"""
