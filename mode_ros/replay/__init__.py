"""Bag replay: run a checkpoint on recorded demonstrations and score what it would have done.

``mode-ros replay BAG --checkpoint CKPT [--topics map.yaml] [--rate 1.0] [--out DIR] [--offline]``

* **live** (default): starts the installed ``policy_node`` (``use_sim_time:=true``, parameters from
  ``config/policy.yaml`` + overrides) or attaches to a running one (``--attach``), publishes the bag's
  camera, goal (and state) messages on the node's topics with the recorded timing scaled by
  ``--rate`` and ``/clock`` from the bag's receive times, records every ``ActionChunk`` the node
  publishes and writes them to ``OUT/chunks`` (a rosbag2) beside ``OUT/report.json`` and plots.
* **offline** (``--offline``): the same messages go straight to ``MoDEPolicy`` through the same
  image decoding and the same chunk execution / safety / camera sync code as the node
  (:mod:`mode_ros.replay.offline`, over the one controller of :mod:`mode_ros.control`), in bag time, without DDS.

Both modes see the same event sequence (:func:`mode_ros.replay.session.schedule`): ``/clock`` jumps to half a control
period before the bag's first message (so the node's first, jump-triggered timer tick lands off the
grid), then the clock is set at every message time and at every multiple of the control period — the
node's timer ticks exactly there. A message recorded at or before a tick time is delivered before
that tick. The recorded actions (the topic map's ``action`` mapping, the same code as ``mode-ros
convert bag``) are never sent to the node: they are what the predictions are scored against
(:mod:`mode_ros.replay.scoring`).

The bag is streamed (:mod:`mode_ros.replay.bag_stream`): memory is bounded by the camera sync queues,
a short window of recorded actions and the chunks awaiting their recorded future, never by the bag
size. A truncated/corrupt bag is salvaged and scored as far as it is readable; a mapped topic
missing from the bag is reported by name and everything that does not need it still runs.

Modules: ``session`` (what both modes share), ``offline``, ``live``, ``runner`` (:func:`run_replay`,
the report), ``bag_stream`` (streaming reader), ``scoring``, ``cli`` (``mode-ros replay``). Import
order is one way: cli -> runner -> offline | live -> session -> scoring, bag_stream.
"""
