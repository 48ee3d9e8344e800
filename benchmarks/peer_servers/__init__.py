"""Scripts the peer servers of the serving benchmark run, each in its own process."""
