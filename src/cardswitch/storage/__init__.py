"""Storage building blocks shared by the journal and the simulated banks."""
