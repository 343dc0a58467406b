"""Verification on the .bin sets (LFW, CFP, AgeDB, ...): 10-fold accuracy, VAL@FAR."""
