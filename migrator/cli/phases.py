"""Commands that walk the phases: plan, advance, rollback, status, history."""
