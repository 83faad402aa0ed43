"""Discovery: watch a service's DNS and connections, and build its dependency graph."""
