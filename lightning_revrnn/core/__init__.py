"""The reversible core, bottom up: fixed-point arithmetic (:mod:`.fixed_point`), gate equations (:mod:`.gates`),
the information buffer (:mod:`.buffer`) and its accounting (:mod:`.accounting`), the cells (:mod:`.cell_base`,
:mod:`.cells`) and their records (:mod:`.records`), the backend seam (:mod:`.backend`), the head/stem protocol
(:mod:`.protocol`), a window's plan (:mod:`.window`), the forward (:mod:`.forward`) and the reverse sweep
(:mod:`.sweep`), and the sequence modules (:mod:`.rnn`). Nothing here imports the model families or the fused
backend.
"""
