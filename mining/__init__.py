"""Hard-sample miners and samplers: difficulty scores, easy/hard sampler, PK sampler, triplet mining."""
