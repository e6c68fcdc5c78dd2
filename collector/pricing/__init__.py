"""The price book: what each model's tokens cost, in integer nano-units of the book's currency."""
