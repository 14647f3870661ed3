"""`reparam bench`, framework-free: the measurement plan every backend runs (`plan`), the report
(`report`), side-by-side timing in interleaved rounds (`timing`), the plain-layer reference of a
deploy form (`plain`) and the child side of the JSON-lines protocol of worker processes
(`protocol`).
"""
