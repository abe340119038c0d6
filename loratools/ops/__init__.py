"""Operations on tensors and adapters: pure functions; formats stay at the edges."""
