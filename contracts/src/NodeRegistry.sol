// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {Nonces} from "@openzeppelin/contracts/utils/Nonces.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {INodeRegistry} from "./interfaces/INodeRegistry.sol";

/// @title NodeRegistry
/// @notice Nodes bond ETH stake proportional to their declared capacity. The node key (the address of the
/// node's secp256k1 libp2p peer key) proves control by signing an EIP-712 Registration for its operator.
/// Slashed stake stays locked in this contract for good (it is burned in effect).
contract NodeRegistry is AccessControl, EIP712, Nonces, ReentrancyGuardTransient, INodeRegistry {
    /// @notice Lifecycle of a node.
    enum Status {
        None,
        Active,
        Unbonding,
        Withdrawn
    }

    /// @notice A registered node.
    struct Node {
        address operator; // receives shares and the returned stake
        Status status;
        uint64 unbondsAt; // when withdraw becomes possible (set by beginUnbond; kept after withdraw)
        uint64 bondedAt; // when the current bond (registration) started
        uint256 capacity; // declared capacity, in the unit that stakePerUnit prices
        uint256 stake; // bonded stake in wei, after slashing
    }

    /// @notice EIP-712 type hash of Registration.
    bytes32 public constant REGISTRATION_TYPEHASH =
        keccak256("Registration(address operator,address nodeKey,uint256 capacity,uint256 nonce)");

    /// @notice Stake required per unit of declared capacity, in wei.
    uint256 public immutable stakePerUnit;

    /// @notice Seconds between beginUnbond and withdraw.
    uint64 public immutable unbondingDelay;

    /// @notice Largest unbonding delay (365 days): beginUnbond computes block.timestamp + unbondingDelay in uint64,
    /// and a delay near 2^64 would make that overflow and lock every stake for good.
    uint64 public constant MAX_UNBONDING_DELAY = 365 days;

    /// @notice The ContributionLedger (the only slasher); set once.
    address public ledger;

    /// @notice Total wei slashed so far (locked here forever).
    uint256 public totalSlashed;

    mapping(address nodeKey => Node) private _nodes;

    /// @notice The node key is zero.
    error NodeRegistryInvalidNodeKey();
    /// @notice The node is already registered (active or unbonding).
    /// @param nodeKey The node.
    error NodeRegistryAlreadyRegistered(address nodeKey);
    /// @notice The node is not registered.
    /// @param nodeKey The node.
    error NodeRegistryUnknownNode(address nodeKey);
    /// @notice Declared capacity is zero, or so large that capacity * stakePerUnit overflows.
    /// @param capacity The capacity given.
    /// @param maxCapacity The largest capacity accepted.
    error NodeRegistryInvalidCapacity(uint256 capacity, uint256 maxCapacity);
    /// @notice The stake sent is below capacity * stakePerUnit.
    /// @param sent Wei sent.
    /// @param required Wei required.
    error NodeRegistryInsufficientStake(uint256 sent, uint256 required);
    /// @notice The peer-key signature is malformed or not by the node key.
    /// @param nodeKey The node key that had to sign.
    /// @param recovered The signer recovered (zero if none).
    error NodeRegistryInvalidPeerKeySignature(address nodeKey, address recovered);
    /// @notice The caller is not the node's operator.
    /// @param nodeKey The node.
    /// @param caller The caller.
    error NodeRegistryNotOperator(address nodeKey, address caller);
    /// @notice The node is not in the status the call needs.
    /// @param nodeKey The node.
    /// @param status Its current status.
    error NodeRegistryWrongStatus(address nodeKey, Status status);
    /// @notice The unbonding delay has not passed.
    /// @param nodeKey The node.
    /// @param unbondsAt When withdraw becomes possible.
    error NodeRegistryStillUnbonding(address nodeKey, uint64 unbondsAt);
    /// @notice The caller is not the ledger.
    /// @param caller The caller.
    error NodeRegistryNotLedger(address caller);
    /// @notice The ledger is already set.
    /// @param ledger The ledger already set.
    error NodeRegistryLedgerAlreadySet(address ledger);
    /// @notice The ledger address is zero.
    error NodeRegistryInvalidLedger();
    /// @notice The unbonding delay is above MAX_UNBONDING_DELAY.
    /// @param unbondingDelay The delay given.
    /// @param maxUnbondingDelay The largest delay accepted.
    error NodeRegistryInvalidUnbondingDelay(uint64 unbondingDelay, uint64 maxUnbondingDelay);

    /// @notice A node registered.
    event NodeRegistered(address indexed nodeKey, address indexed operator, uint256 capacity, uint256 stake);
    /// @notice A node began unbonding.
    event UnbondingStarted(address indexed nodeKey, uint64 unbondsAt);
    /// @notice A node withdrew its stake.
    event StakeWithdrawn(address indexed nodeKey, address indexed operator, uint256 amount);
    /// @notice A node was slashed.
    event NodeSlashed(address indexed nodeKey, uint256 amount, bytes32 evidence);
    /// @notice The ledger was set.
    event LedgerSet(address ledger);

    /// @param admin Holder of DEFAULT_ADMIN_ROLE (can set the ledger once).
    /// @param stakePerUnit_ Wei of stake per unit of capacity.
    /// @param unbondingDelay_ Seconds from beginUnbond to withdraw.
    constructor(address admin, uint256 stakePerUnit_, uint64 unbondingDelay_) EIP712("PMN NodeRegistry", "1") {
        if (unbondingDelay_ > MAX_UNBONDING_DELAY) {
            revert NodeRegistryInvalidUnbondingDelay(unbondingDelay_, MAX_UNBONDING_DELAY);
        }
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        stakePerUnit = stakePerUnit_;
        unbondingDelay = unbondingDelay_;
    }

    /// @notice Sets the ContributionLedger once; admin only.
    /// @param ledger_ The ledger address (non-zero).
    function setLedger(address ledger_) external onlyRole(DEFAULT_ADMIN_ROLE) {
        if (ledger != address(0)) revert NodeRegistryLedgerAlreadySet(ledger);
        if (ledger_ == address(0)) revert NodeRegistryInvalidLedger();
        ledger = ledger_;
        emit LedgerSet(ledger_);
    }

    /// @notice Registers a node operated by the caller, bonding msg.value as stake.
    /// @param nodeKey Address of the node's peer key.
    /// @param capacity Declared capacity (> 0); msg.value must be >= capacity * stakePerUnit.
    /// @param peerKeySignature EIP-712 Registration(operator=msg.sender, nodeKey, capacity, nonces(nodeKey))
    /// signed by the node key.
    function register(address nodeKey, uint256 capacity, bytes calldata peerKeySignature) external payable {
        if (nodeKey == address(0)) revert NodeRegistryInvalidNodeKey();
        Node storage n = _nodes[nodeKey];
        if (n.status == Status.Active || n.status == Status.Unbonding) revert NodeRegistryAlreadyRegistered(nodeKey);
        uint256 maxCapacity = stakePerUnit == 0 ? type(uint256).max : type(uint256).max / stakePerUnit;
        if (capacity == 0 || capacity > maxCapacity) revert NodeRegistryInvalidCapacity(capacity, maxCapacity);
        uint256 required = capacity * stakePerUnit;
        if (msg.value < required) revert NodeRegistryInsufficientStake(msg.value, required);
        bytes32 digest = _hashTypedDataV4(
            keccak256(abi.encode(REGISTRATION_TYPEHASH, msg.sender, nodeKey, capacity, nonces(nodeKey)))
        );
        (address recovered, ECDSA.RecoverError err, ) = ECDSA.tryRecover(digest, peerKeySignature);
        if (err != ECDSA.RecoverError.NoError || recovered != nodeKey) {
            revert NodeRegistryInvalidPeerKeySignature(nodeKey, recovered);
        }
        _useNonce(nodeKey);
        n.operator = msg.sender;
        n.status = Status.Active;
        n.unbondsAt = 0;
        n.bondedAt = uint64(block.timestamp);
        n.capacity = capacity;
        n.stake = msg.value;
        emit NodeRegistered(nodeKey, msg.sender, capacity, msg.value);
    }

    /// @notice Starts the unbonding delay; operator only. The node stays slashable until it withdraws. The ledger
    /// mints a leaf of this node only for roots whose challenge window closes by `unbondsAt`.
    /// @param nodeKey The node.
    function beginUnbond(address nodeKey) external {
        Node storage n = _operatorNode(nodeKey);
        if (n.status != Status.Active) revert NodeRegistryWrongStatus(nodeKey, n.status);
        uint64 unbondsAt = uint64(block.timestamp) + unbondingDelay;
        n.status = Status.Unbonding;
        n.unbondsAt = unbondsAt;
        emit UnbondingStarted(nodeKey, unbondsAt);
    }

    /// @notice Returns the remaining stake to the operator after the unbonding delay; operator only.
    /// @param nodeKey The node.
    function withdraw(address nodeKey) external nonReentrant {
        Node storage n = _operatorNode(nodeKey);
        if (n.status != Status.Unbonding) revert NodeRegistryWrongStatus(nodeKey, n.status);
        if (block.timestamp < n.unbondsAt) revert NodeRegistryStillUnbonding(nodeKey, n.unbondsAt);
        uint256 amount = n.stake;
        n.stake = 0;
        n.status = Status.Withdrawn;
        emit StakeWithdrawn(nodeKey, msg.sender, amount);
        Address.sendValue(payable(msg.sender), amount);
    }

    /// @inheritdoc INodeRegistry
    function slash(address nodeKey, uint256 amount, bytes32 evidence) external returns (uint256 slashed) {
        if (msg.sender != ledger) revert NodeRegistryNotLedger(msg.sender);
        Node storage n = _nodes[nodeKey];
        slashed = amount < n.stake ? amount : n.stake;
        n.stake -= slashed;
        totalSlashed += slashed;
        emit NodeSlashed(nodeKey, slashed, evidence);
    }

    /// @notice The full record of a node.
    /// @param nodeKey The node.
    function getNode(address nodeKey) external view returns (Node memory) {
        return _nodes[nodeKey];
    }

    /// @inheritdoc INodeRegistry
    function operatorOf(address nodeKey) external view returns (address) {
        return _nodes[nodeKey].operator;
    }

    /// @inheritdoc INodeRegistry
    function bondOf(address nodeKey) external view returns (address operator, uint64 bondedAt, uint64 withdrawableAt) {
        Node storage n = _nodes[nodeKey];
        operator = n.operator;
        bondedAt = n.bondedAt;
        withdrawableAt = n.status == Status.Active ? type(uint64).max : n.unbondsAt;
    }

    /// @inheritdoc INodeRegistry
    function stakeOf(address nodeKey) external view returns (uint256) {
        return _nodes[nodeKey].stake;
    }

    /// @notice The EIP-712 domain separator (for off-chain signers).
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _operatorNode(address nodeKey) private view returns (Node storage n) {
        n = _nodes[nodeKey];
        if (n.status == Status.None) revert NodeRegistryUnknownNode(nodeKey);
        if (n.operator != msg.sender) revert NodeRegistryNotOperator(nodeKey, msg.sender);
    }
}
