"""pmn package."""
