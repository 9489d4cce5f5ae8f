"""Data sources (synthetic, VoiceBank-DEMAND, user folders) and preparation."""
