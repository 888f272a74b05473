"""Nothing to configure: ray_local, actor_factory, loop_lag_guard and the markers
come from the asyncsync plugin (the ``pytest11`` entry point)."""
