"""The core every stage uses: profiles, assets and their cache, the network guard, text batching, masked statistics, scale-out helpers, command lines."""
