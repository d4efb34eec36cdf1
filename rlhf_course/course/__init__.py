"""What sits on top: notebook helpers, the course runner, benchmarks and plots."""
