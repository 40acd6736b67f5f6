"""The simulator: runs any algorithm's clients on a process pool and aggregates their shared parts."""
