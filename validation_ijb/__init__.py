"""IJB-B / IJB-C 1:1 verification and 1:N identification."""
