"""The BERT itself and what it costs: `bert` (Hugging Face's module and key names), `attention`,
`dropout`, and the planner's `memory` and `flops`."""
