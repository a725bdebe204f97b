"""The chunk controller (ROS-free, clock injected): the one copy of the logic that turns observations
and inference results into one action chunk per control tick. Driven by the policy node
(mode_ros.ros.policy_node), offline bag replay (mode_ros.replay.offline) and sim eval
(mode_ros.sim.evaluate).

Modules: ``controller`` (ChunkController: inputs, goal, tick grid, gate, serving, adoption, safety step),
``strategy`` (execution strategies: open loop, re-plan every k, temporal ensembling, real-time chunking),
``execution`` (ChunkExecutor: rows per tick, latency skipping, pending plans, ensembling), ``virtual``
(VirtualTime: inference results landing after a modelled latency in bag/sim time), ``sync`` (camera
stamp matching), ``safety`` (finite check, bounds, rate limit, output gate), ``stats`` (counters,
latency windows, rate meter, rate-limited log).
"""
