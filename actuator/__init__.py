"""The actuator: an Alertmanager webhook that prunes builders through the core."""
