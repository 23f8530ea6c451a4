"""The paper's network: parameter counts, shapes, deploy/fold equivalence, gradients."""

import pytest
import torch

from flareseg.errors import FlareSegError
from flareseg.network import (
    DeployUNet,
    NetworkConfig,
    build_deploy_network,
    build_training_network,
    count_parameters,
    fold_input_channels,
)
from flareseg.train.loss import LossWeights, deep_supervision_loss

SMALL = NetworkConfig(base_width=4, ds_channels=4)


def _randomise_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Give BatchNorm non-trivial statistics so that eval-mode equivalence tests mean something."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_parameter_counts_match_the_paper_network():
    net = build_training_network()
    assert count_parameters(net) == 20_735_897
    assert count_parameters(build_deploy_network(net)) == 20_732_997
    # The paper's 30,146,777 counts the VGG-13-BN encoder twice.
    encoder = sum(p.numel() for p in net.encoder.parameters())
    assert encoder == 9_410_880
    assert count_parameters(net) + encoder == 30_146_777


def test_training_mode_returns_final_and_four_aux_at_input_resolution():
    net = build_training_network(SMALL).train()
    logits, aux = net(torch.randn(2, 3, 48, 32))
    assert logits.shape == (2, 5, 48, 32)
    assert [tuple(a.shape) for a in aux] == [(2, 5, 48, 32)] * 4


def test_eval_and_deploy_return_logits_only():
    net = build_training_network(SMALL).eval()
    out = net(torch.randn(1, 3, 32, 32))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 5, 32, 32)
    deploy = build_deploy_network(net).train()  # even in train mode: no heads to return
    assert not any(k.startswith("aux.") for k in deploy.state_dict())
    assert isinstance(deploy(torch.randn(1, 3, 32, 32)), torch.Tensor)


@pytest.mark.parametrize("config", [SMALL, NetworkConfig()], ids=["small", "full-width"])
def test_deploy_logits_equal_training_final_logits(config):
    torch.manual_seed(0)
    net = build_training_network(config)
    _randomise_bn(net)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = net(x)
        got = build_deploy_network(net)(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("config", [SMALL, NetworkConfig()], ids=["small", "full-width"])
def test_folded_one_channel_network_matches_replicated_input(config):
    torch.manual_seed(1)
    net = build_training_network(config)
    _randomise_bn(net)
    net.eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        ref = net(x.expand(-1, 3, -1, -1))
        folded = fold_input_channels(net)
        got = folded(x)
    assert folded.config.in_channels == 1
    assert folded.encoder[0][0].weight.shape[1] == 1
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.999
    assert isinstance(build_deploy_network(net, fold_input=True), DeployUNet)


def test_networks_built_from_weights_hold_them_without_initialising_first():
    torch.manual_seed(2)
    net = build_training_network(SMALL)
    _randomise_bn(net)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    loaded = build_training_network(SMALL, state=state)
    deploy = build_deploy_network(loaded, fold_input=True)
    shared = build_deploy_network(loaded, copy=False)
    # No random initialisation ran: the global generator is where it was (each init would draw from it).
    assert torch.equal(torch.get_rng_state(), rng)
    # The loaded network is made of the given tensors; a deploy graph copies them unless told not to.
    assert all(v.data_ptr() == state[k].data_ptr() for k, v in loaded.state_dict().items())
    assert all(v.data_ptr() == state[k].data_ptr() for k, v in shared.state_dict().items())
    assert all(v.data_ptr() != state[k].data_ptr() for k, v in deploy.state_dict().items())
    folded = fold_input_channels(build_deploy_network(net))
    assert folded.state_dict().keys() == deploy.state_dict().keys()
    for key, value in deploy.state_dict().items():
        assert torch.equal(value, folded.state_dict()[key]), key
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), net.eval()(x.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_training_network(NetworkConfig(base_width=8, ds_channels=4), state=state)


def test_folding_twice_is_refused():
    folded = fold_input_channels(build_training_network(SMALL))
    with pytest.raises(FlareSegError, match="already takes one input channel"):
        fold_input_channels(folded)


def test_every_parameter_gets_a_gradient_from_the_deep_supervised_loss():
    torch.manual_seed(2)
    net = build_training_network(SMALL).train()
    x = torch.randn(2, 3, 32, 32)
    target = torch.randint(0, 5, (2, 32, 32))
    logits, aux = net(x)
    deep_supervision_loss(logits, aux, target).backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.any(p.grad != 0)]
    assert missing == []


def test_loss_weights_are_applied():
    torch.manual_seed(3)
    logits = torch.randn(1, 5, 8, 8)
    aux = [torch.randn(1, 5, 8, 8) for _ in range(4)]
    target = torch.randint(0, 5, (1, 8, 8))
    ce = torch.nn.functional.cross_entropy
    expected = ce(logits, target) + sum(w * ce(a, target) for w, a in zip((0.8, 0.7, 0.6, 0.5), aux, strict=True))
    torch.testing.assert_close(deep_supervision_loss(logits, aux, target), expected)
    only_level2 = LossWeights(final=0.0, aux=(0.0, 1.0, 0.0, 0.0))
    torch.testing.assert_close(deep_supervision_loss(logits, aux, target, only_level2), ce(aux[1], target))
    with pytest.raises(FlareSegError, match="expected 4 auxiliary outputs, got 3"):  # said, not zip's ValueError
        deep_supervision_loss(logits, aux[:3], target)


@pytest.mark.parametrize("shape", [(1, 3, 40, 32), (1, 3, 32, 24)])
def test_sizes_not_divisible_by_16_are_refused(shape):
    with pytest.raises(FlareSegError, match="not a multiple of 16"):
        build_training_network(SMALL)(torch.randn(*shape))


def test_wrong_channel_count_is_refused():
    with pytest.raises(FlareSegError, match=r"\(N, 3, H, W\)"):
        build_training_network(SMALL)(torch.randn(1, 1, 32, 32))


def test_config_round_trips_and_rejects_bad_values():
    cfg = NetworkConfig(base_width=8, in_channels=1)
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(FlareSegError, match="base_width"):
        NetworkConfig(base_width=0)
    with pytest.raises(FlareSegError, match="unknown network config keys"):
        NetworkConfig.from_dict({"width": 3})


def test_aux_outputs_run_from_the_full_resolution_level_to_the_deepest():
    # Each aux head sees only its own level's maps: perturbing one level's maps moves only its aux output. The
    # loss weights (0.8 for level 1 ... 0.5 for level 4) follow this order; the shapes alone cannot tell it.
    net = build_training_network(SMALL).train()
    x = torch.randn(2, SMALL.in_channels, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, before = net(x)
        for p in net.ds[3].parameters():  # the decoder's last level: full resolution
            p.add_(0.5)
        _, after = net(x)
    moved = [not torch.equal(b, a) for b, a in zip(before, after, strict=True)]
    assert moved == [True, False, False, False]


def test_each_deep_supervision_map_is_upsampled_bilinearly_without_aligned_corners():
    # SPEC: bilinear, align_corners=False; nearest or aligned corners changed every checkpoint's output unnoticed.
    import torch.nn.functional as F

    torch.manual_seed(0)
    net = build_training_network(NetworkConfig(base_width=4)).eval()
    maps, head_input = [], []
    hooks = [ds.register_forward_hook(lambda m, i, o: maps.append(o)) for ds in net.ds]
    hooks.append(net.head.register_forward_hook(lambda m, i, o: head_input.append(i[0])))
    with torch.no_grad():
        net(torch.randn(1, 3, 64, 64))
    for hook in hooks:
        hook.remove()
    assert any(m.shape[-2:] != (64, 64) for m in maps)
    upsampled = [F.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False) for m in maps]
    torch.testing.assert_close(head_input[0], torch.cat(upsampled, dim=1))


def test_a_network_of_one_class_is_refused():
    with pytest.raises(FlareSegError, match="at least 2"):
        NetworkConfig(num_classes=1)
