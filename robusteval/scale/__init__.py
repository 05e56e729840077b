"""Scale-out above the engines: the exact merge of shards (each engine declares how its runs combine) and
torchrun ranks as shards."""
