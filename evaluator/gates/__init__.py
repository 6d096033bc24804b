"""What must hold before any verdict counts: operational guardrails and data health."""
