"""Stand-in for Intel Gaudi's habana_frameworks, for tests on machines without a Gaudi."""
